//! The connection: greeting, capabilities negotiation, id-matched replies and event fan-out.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::Deserialize;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot, watch};

use super::commands::{Command, QmpCapabilities, VersionInfo};
use super::QmpError;

/// An asynchronous event from the daemon.
#[derive(Debug, Clone, Deserialize)]
pub struct Event {
    /// Event name, e.g. `JOB_STATUS_CHANGE`.
    pub event: String,
    /// Event payload.
    #[serde(default)]
    pub data: Value,
}

type Reply = Result<Value, QmpError>;

#[derive(Debug, Default)]
struct Shared {
    pending: HashMap<u64, oneshot::Sender<Reply>>,
    subscribers: Vec<mpsc::UnboundedSender<Event>>,
    /// Set once the reader saw EOF; later calls fail fast.
    closed: bool,
}

#[derive(Debug)]
struct Inner {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    shared: Mutex<Shared>,
    next_id: AtomicU64,
    closed_tx: watch::Sender<bool>,
    version: VersionInfo,
    /// Where each command's round trip is recorded, by command name.
    latency: std::sync::OnceLock<prometheus::HistogramVec>,
}

/// A connected QMP client. Cheap to clone; all clones share the connection.
#[derive(Debug, Clone)]
pub struct QmpClient {
    inner: Arc<Inner>,
}

#[derive(Deserialize)]
struct Greeting {
    #[serde(rename = "QMP")]
    qmp: GreetingBody,
}

#[derive(Deserialize)]
struct GreetingBody {
    version: VersionInfo,
}

impl QmpClient {
    /// Connects to a QMP unix socket, reads the greeting and enters command mode.
    pub async fn connect(path: &Path) -> Result<Self, QmpError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| QmpError::Connect { path: path.display().to_string(), source })?;
        let (read, write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        let greeting = lines
            .next_line()
            .await
            .map_err(|e| QmpError::Protocol(format!("reading greeting: {e}")))?
            .ok_or(QmpError::Disconnected)?;
        let greeting: Greeting =
            serde_json::from_str(&greeting).map_err(|source| QmpError::Decode { source })?;
        let (closed_tx, _) = watch::channel(false);
        let inner = Arc::new(Inner {
            writer: tokio::sync::Mutex::new(write),
            shared: Mutex::new(Shared::default()),
            next_id: AtomicU64::new(1),
            closed_tx,
            version: greeting.qmp.version,
            latency: std::sync::OnceLock::new(),
        });
        tokio::spawn(read_loop(lines, Arc::downgrade(&inner)));
        let client = QmpClient { inner };
        client.call(&QmpCapabilities {}).await?;
        Ok(client)
    }

    /// Records every command's round trip from now on in `histogram` (labelled by command).
    pub fn record_latency(&self, histogram: prometheus::HistogramVec) {
        let _ = self.inner.latency.set(histogram);
    }

    /// The daemon's version, from the greeting.
    pub fn version(&self) -> &VersionInfo {
        &self.inner.version
    }

    /// True once the connection has ended.
    pub fn is_closed(&self) -> bool {
        *self.inner.closed_tx.borrow()
    }

    /// Resolves when the connection ends (the daemon exited or closed the socket).
    pub async fn closed(&self) {
        let mut rx = self.inner.closed_tx.subscribe();
        // Err means the sender is gone, which also means closed.
        let _ = rx.wait_for(|closed| *closed).await;
    }

    /// Subscribes to every event that arrives from now on. The receiver yields `None` once the
    /// connection ends.
    pub fn subscribe(&self) -> mpsc::UnboundedReceiver<Event> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut shared = lock(&self.inner.shared);
        if !shared.closed {
            shared.subscribers.push(tx);
        }
        rx
    }

    /// Executes a typed command and decodes its reply.
    pub async fn call<C: Command>(&self, command: &C) -> Result<C::Reply, QmpError> {
        let args = serde_json::to_value(command).map_err(|source| QmpError::Decode { source })?;
        let value = self.execute(C::NAME, args).await?;
        serde_json::from_value(value).map_err(|source| QmpError::Decode { source })
    }

    /// Executes a command given by name with JSON arguments (`Null` or `{}` for none).
    pub async fn execute(&self, name: &str, args: Value) -> Result<Value, QmpError> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let mut request = serde_json::json!({ "execute": name, "id": id });
        if !(args.is_null() || args.as_object().is_some_and(|o| o.is_empty())) {
            request["arguments"] = args;
        }
        let mut line = request.to_string();
        line.push('\n');
        let (tx, rx) = oneshot::channel();
        {
            let mut shared = lock(&self.inner.shared);
            if shared.closed {
                return Err(QmpError::Disconnected);
            }
            shared.pending.insert(id, tx);
        }
        tracing::trace!(command = name, id, "qmp call");
        let written = {
            let mut writer = self.inner.writer.lock().await;
            writer.write_all(line.as_bytes()).await
        };
        if written.is_err() {
            lock(&self.inner.shared).pending.remove(&id);
            return Err(QmpError::Disconnected);
        }
        let timer = self.inner.latency.get().map(|h| h.with_label_values(&[name]).start_timer());
        let reply = rx.await.unwrap_or(Err(QmpError::Disconnected));
        drop(timer);
        reply
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding this lock cannot leave the maps half-updated, so poisoning is ignored.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

async fn read_loop(
    mut lines: tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    inner: std::sync::Weak<Inner>,
) {
    loop {
        let line = match lines.next_line().await {
            Ok(Some(line)) => line,
            Ok(None) | Err(_) => break,
        };
        let Some(inner) = inner.upgrade() else { return };
        dispatch(&inner, &line);
    }
    if let Some(inner) = inner.upgrade() {
        let mut shared = lock(&inner.shared);
        shared.closed = true;
        for (_, tx) in shared.pending.drain() {
            let _ = tx.send(Err(QmpError::Disconnected));
        }
        shared.subscribers.clear();
        drop(shared);
        inner.closed_tx.send_replace(true);
    }
}

fn dispatch(inner: &Inner, line: &str) {
    let message: Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(error = %e, "ignoring a QMP line that is not JSON");
            return;
        }
    };
    if message.get("event").is_some() {
        match serde_json::from_value::<Event>(message) {
            Ok(event) => {
                tracing::debug!(event = %event.event, data = %event.data, "qmp event");
                let mut shared = lock(&inner.shared);
                shared.subscribers.retain(|tx| tx.send(event.clone()).is_ok());
            }
            Err(e) => tracing::warn!(error = %e, "ignoring a malformed QMP event"),
        }
        return;
    }
    let Some(id) = message.get("id").and_then(Value::as_u64) else {
        tracing::warn!(%message, "ignoring a QMP reply without our id");
        return;
    };
    let reply = if let Some(ret) = message.get("return") {
        Ok(ret.clone())
    } else if let Some(err) = message.get("error") {
        Err(QmpError::Command {
            class: err.get("class").and_then(Value::as_str).unwrap_or("GenericError").to_owned(),
            desc: err.get("desc").and_then(Value::as_str).unwrap_or_default().to_owned(),
        })
    } else {
        Err(QmpError::Protocol(format!("reply without return or error: {message}")))
    };
    if let Some(tx) = lock(&inner.shared).pending.remove(&id) {
        let _ = tx.send(reply);
    }
}
