//! Waking calls held by `Prefer: wait=N` when their answers arrive: one connection LISTENs on
//! the notification channel of every role with a call waiting (the extension notifies a role's
//! channel, `llm_channel()`, when requests of the role finish), and each notification wakes the
//! calls of that role, which then look at their request again. Nothing polls the table.

use futures_util::StreamExt;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, Notify};

/// The channels listened on, each with the calls waiting on it.
#[derive(Clone)]
pub struct Waiting {
    channels: Arc<Mutex<HashMap<String, Arc<Notify>>>>,
    /// Channels to LISTEN on, sent to the listener task.
    listen: mpsc::UnboundedSender<String>,
}

impl Waiting {
    /// Starts the listener; it reconnects (listening on every known channel again) whenever its
    /// connection is lost, and wakes every waiting call then, as a notification may have been
    /// missed.
    pub fn start(config: tokio_postgres::Config) -> Waiting {
        let channels: Arc<Mutex<HashMap<String, Arc<Notify>>>> = Arc::default();
        let (listen, requests) = mpsc::unbounded_channel();
        tokio::spawn(listener(config, channels.clone(), requests));
        Waiting { channels, listen }
    }

    /// The notifier of a channel, listened on from now on.
    pub fn channel(&self, name: &str) -> Arc<Notify> {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(notify) = channels.get(name) {
            return notify.clone();
        }
        let notify = Arc::new(Notify::new());
        channels.insert(name.to_owned(), notify.clone());
        let _ = self.listen.send(name.to_owned());
        notify
    }
}

fn listen_sql(channel: &str) -> String {
    format!("LISTEN \"{}\"", channel.replace('"', "\"\""))
}

async fn listener(
    config: tokio_postgres::Config,
    channels: Arc<Mutex<HashMap<String, Arc<Notify>>>>,
    mut requests: mpsc::UnboundedReceiver<String>,
) {
    loop {
        match config.connect(tokio_postgres::NoTls).await {
            Ok((client, mut connection)) => {
                // The connection is driven by a task of its own (every command's answer comes
                // through it), which hands the notifications over.
                let (heard, mut notifications) = mpsc::unbounded_channel::<String>();
                let driver = tokio::spawn(async move {
                    let mut stream =
                        futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
                    while let Some(Ok(message)) = stream.next().await {
                        if let tokio_postgres::AsyncMessage::Notification(n) = message {
                            let _ = heard.send(n.channel().to_owned());
                        }
                    }
                });
                let known: Vec<String> = channels
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .keys()
                    .cloned()
                    .collect();
                let mut ok = true;
                for channel in &known {
                    ok &= client.batch_execute(&listen_sql(channel)).await.is_ok();
                }
                // A notification may have been missed while not listening.
                wake_all(&channels);
                while ok {
                    tokio::select! {
                        channel = notifications.recv() => match channel {
                            Some(channel) => {
                                let notify = channels.lock().unwrap_or_else(|p| p.into_inner()).get(&channel).cloned();
                                if let Some(notify) = notify {
                                    notify.notify_waiters();
                                }
                            }
                            None => ok = false,
                        },
                        channel = requests.recv() => match channel {
                            Some(channel) => ok = client.batch_execute(&listen_sql(&channel)).await.is_ok(),
                            None => {
                                driver.abort();
                                return;
                            }
                        },
                    }
                }
                driver.abort();
                eprintln!("llmbatching-gateway: the notification listener lost its connection; reconnecting");
            }
            Err(e) => {
                eprintln!("llmbatching-gateway: the notification listener cannot connect: {e}")
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn wake_all(channels: &Mutex<HashMap<String, Arc<Notify>>>) {
    for notify in channels.lock().unwrap_or_else(|p| p.into_inner()).values() {
        notify.notify_waiters();
    }
}
