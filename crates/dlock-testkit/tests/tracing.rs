//! The tracing spans and events dlock emits are an interface (the table in
//! docs/ARCHITECTURE.md, "Tracing"): this test captures them with a
//! subscriber of its own during a scripted run on the memory backend and
//! checks their names, levels and fields.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use dlock_core::{LockError, Locker};
use dlock_testkit::MemoryBackend;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

type Fields = BTreeMap<String, String>;

/// A span as it ended up: its name and every field recorded on it.
#[derive(Debug, Clone)]
struct SeenSpan {
    name: String,
    fields: Fields,
}

#[derive(Debug, Clone)]
struct SeenEvent {
    message: String,
    level: Level,
    /// The name of the span it happened in, if any.
    span: Option<String>,
    fields: Fields,
}

#[derive(Default)]
struct Seen {
    spans: BTreeMap<u64, SeenSpan>,
    events: Vec<SeenEvent>,
}

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Seen>>);

impl Capture {
    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

struct FieldsOf<'a>(&'a mut Fields);

impl Visit for FieldsOf<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

impl<S: Subscriber + for<'a> LookupSpan<'a>> tracing_subscriber::Layer<S> for Capture {
    fn on_new_span(&self, attributes: &Attributes<'_>, id: &Id, _: Context<'_, S>) {
        let mut fields = Fields::new();
        attributes.record(&mut FieldsOf(&mut fields));
        let span = SeenSpan {
            name: attributes.metadata().name().to_owned(),
            fields,
        };
        self.seen().spans.insert(id.into_u64(), span);
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, _: Context<'_, S>) {
        if let Some(span) = self.seen().spans.get_mut(&id.into_u64()) {
            values.record(&mut FieldsOf(&mut span.fields));
        }
    }

    fn on_event(&self, event: &Event<'_>, context: Context<'_, S>) {
        let mut fields = Fields::new();
        event.record(&mut FieldsOf(&mut fields));
        let message = fields.remove("message").unwrap_or_default();
        let span = context.event_span(event).map(|span| span.name().to_owned());
        self.seen().events.push(SeenEvent {
            message,
            level: *event.metadata().level(),
            span,
            fields,
        });
    }
}

fn spans_named(seen: &Seen, name: &str) -> Vec<SeenSpan> {
    seen.spans
        .values()
        .filter(|span| span.name == name)
        .cloned()
        .collect()
}

fn has_fields(fields: &Fields, names: &[&str]) -> bool {
    names.iter().all(|name| fields.contains_key(*name))
}

#[tokio::test(start_paused = true)]
async fn spans_and_events_carry_their_documented_fields() {
    let capture = Capture::default();
    let subscriber = tracing_subscriber::registry().with(capture.clone());
    let _default = tracing::subscriber::set_default(subscriber);

    let locker = Locker::new(MemoryBackend::new());
    let key = "tracing/scripted";

    let guard = locker.lock(key).ttl(Duration::from_secs(3)).await.expect("free");
    let token = guard.fencing_token().to_string();
    assert!(matches!(
        locker.try_lock(key).await,
        Err(LockError::Contended { .. })
    ));
    let timed_out = locker.lock(key).wait(Duration::from_millis(50)).await;
    assert!(matches!(timed_out, Err(LockError::Timeout { .. })));
    tokio::time::sleep(Duration::from_millis(1_500)).await; // one renewal
    guard.extend(Duration::from_secs(3)).await.expect("extend");
    guard.release().await.expect("release");
    let expiring = locker
        .lock(key)
        .ttl(Duration::from_secs(1))
        .auto_renew(false)
        .await
        .expect("free");
    expiring.lost().await;
    let lost_token = expiring.fencing_token().to_string();
    drop(expiring);

    let seen = capture.seen();
    let acquires = spans_named(&seen, "dlock.acquire");
    let outcomes: Vec<&str> = acquires
        .iter()
        .map(|span| span.fields.get("outcome").map_or("", String::as_str))
        .collect();
    assert_eq!(
        outcomes,
        ["acquired", "contended", "timeout", "acquired"],
        "{acquires:#?}"
    );
    for span in &acquires {
        assert!(
            has_fields(
                &span.fields,
                &["key", "kind", "backend", "ttl_ms", "wait", "outcome"]
            ),
            "{span:?}"
        );
        assert_eq!(span.fields["key"], key);
        assert_eq!(span.fields["kind"], "mutex");
        assert_eq!(span.fields["backend"], "memory");
    }
    assert_eq!(acquires[0].fields.get("token"), Some(&token));
    assert_eq!(
        acquires[1].fields.get("token"),
        None,
        "a refused request has no token"
    );

    let acquired: Vec<&SeenEvent> = seen
        .events
        .iter()
        .filter(|event| event.message == "acquired")
        .collect();
    assert_eq!(acquired.len(), 2);
    for event in acquired {
        assert_eq!(event.span.as_deref(), Some("dlock.acquire"));
        assert_eq!(event.level, Level::DEBUG);
        assert!(has_fields(&event.fields, &["waited_ms"]), "{event:?}");
    }

    let renewals = spans_named(&seen, "dlock.renew");
    assert!(!renewals.is_empty(), "no dlock.renew span");
    assert!(
        renewals
            .iter()
            .all(|span| span.fields.get("token") == Some(&token))
    );
    assert!(
        seen.events
            .iter()
            .any(|event| event.message == "renewed" && event.span.as_deref() == Some("dlock.renew"))
    );

    let extends = spans_named(&seen, "dlock.extend");
    assert_eq!(extends.len(), 1);
    assert!(has_fields(&extends[0].fields, &["key", "token", "ttl_ms"]));

    let releases = spans_named(&seen, "dlock.release");
    assert!(
        releases
            .iter()
            .any(|span| span.fields.get("token") == Some(&token))
    );
    assert!(
        releases
            .iter()
            .all(|span| has_fields(&span.fields, &["key", "token"]))
    );

    let lost: Vec<&SeenEvent> = seen
        .events
        .iter()
        .filter(|event| event.message == "lock lost")
        .collect();
    assert_eq!(lost.len(), 1, "{lost:#?}");
    assert_eq!(lost[0].level, Level::WARN);
    assert_eq!(lost[0].fields.get("key").map(String::as_str), Some(key));
    assert_eq!(lost[0].fields.get("token"), Some(&lost_token));
    assert_eq!(lost[0].fields.get("reason").map(String::as_str), Some("expired"));
    assert!(has_fields(&lost[0].fields, &["why"]));
}
