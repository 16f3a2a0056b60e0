//! Certificates for the TLS suites.

/// A private certificate authority and a server certificate for
/// `localhost` / `127.0.0.1`, written to a temp dir (removed on drop).
pub struct TestCertificates {
    /// The authority's certificate (PEM), for clients to trust.
    pub ca_pem: String,
    /// The authority's certificate file.
    pub ca_file: std::path::PathBuf,
    /// The server's certificate file (PEM).
    pub cert_file: std::path::PathBuf,
    /// The server's private key file (PEM).
    pub key_file: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl TestCertificates {
    /// Creates the authority and the server certificate.
    pub fn create() -> Self {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).expect("CA certificate");
        let server_key = KeyPair::generate().expect("server key");
        let server = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .expect("server params")
            .signed_by(&server_key, &ca, &ca_key)
            .expect("server certificate");
        let dir = tempfile::Builder::new()
            .prefix("dlock-certs-")
            .tempdir()
            .expect("temp dir");
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).expect("write a certificate file");
            path
        };
        TestCertificates {
            ca_pem: ca.pem(),
            ca_file: write("ca.pem", &ca.pem()),
            cert_file: write("server.pem", &server.pem()),
            key_file: write("server.key", &server_key.serialize_pem()),
            _dir: dir,
        }
    }
}
