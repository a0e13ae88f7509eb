//! Keeps the agent connected: runs sessions against the control-plane replicas in turn, moving
//! to the next replica after each failure, with capped exponential backoff and full jitter in
//! between. Only a refused Hello stops it.

use meridian_common::backoff::Backoff;

use crate::session::{self, AgentState, Dialer, SessionError};

#[derive(Debug, thiserror::Error)]
pub enum ConnectorError {
    #[error("no control-plane address given")]
    NoAddresses,
    /// The control plane refused this agent's Hello (INVALID_ARGUMENT); retrying cannot help.
    #[error("control plane at {address} refused this agent")]
    Refused {
        address: String,
        #[source]
        source: SessionError,
    },
}

/// The reconnect loop over a fixed list of replicas.
pub struct Connector<D> {
    addresses: Vec<String>,
    dialer: D,
    backoff: Backoff,
    next: usize,
}

impl<D: Dialer> Connector<D> {
    pub fn new(
        addresses: Vec<String>,
        dialer: D,
        backoff: Backoff,
    ) -> Result<Self, ConnectorError> {
        if addresses.is_empty() {
            return Err(ConnectorError::NoAddresses);
        }
        Ok(Self {
            addresses,
            dialer,
            backoff,
            next: 0,
        })
    }

    /// Runs sessions until a control plane refuses the Hello. Stop it by dropping the future:
    /// the held table is always persisted before it is acknowledged, so nothing is lost.
    pub async fn run(&mut self, state: &mut AgentState) -> ConnectorError {
        loop {
            let address = self.addresses[self.next].clone();
            self.next = (self.next + 1) % self.addresses.len();
            let outcome = session::run(state, &self.dialer, &address).await;
            if outcome.error.is_refusal() {
                return ConnectorError::Refused {
                    address,
                    source: outcome.error,
                };
            }
            if outcome.received_update {
                // That replica worked; its loss is news, not a pattern: retry promptly.
                self.backoff.reset();
            }
            let delay = self.backoff.next_delay();
            tracing::warn!(
                %address,
                error = %crate::error_chain(&outcome.error),
                retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                next = %self.addresses[self.next],
                "control-plane session ended"
            );
            tokio::time::sleep(delay).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::local_api::CurrentTable;
    use crate::session::fake::{self, Attempt};
    use crate::session::Identity;
    use crate::state::StateStore;
    use meridian_proto::v1::{agent_message, Ack, RoutingUpdate};
    use tokio::sync::{mpsc, watch};
    use tokio::time::Instant;
    use tonic::Status;

    const BASE: Duration = Duration::from_millis(100);
    const CAP: Duration = Duration::from_millis(1000);

    fn state(dir: &std::path::Path) -> AgentState {
        let (publisher, _routes) = watch::channel::<CurrentTable>(None);
        let identity = Identity {
            agent_id: "a-1".into(),
            region: "us-east".into(),
            zone: "us-east-a".into(),
            cloud: "local".into(),
            gateway: "127.0.0.1:15002".into(),
        };
        AgentState::new(identity, StateStore::open(dir).unwrap(), publisher, None)
    }

    fn start(
        addresses: &[&str],
    ) -> (
        tokio::task::JoinHandle<ConnectorError>,
        mpsc::UnboundedReceiver<Attempt>,
        tempfile::TempDir,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut state = state(dir.path());
        let (dialer, attempts) = fake::dialer();
        let addresses = addresses.iter().map(|a| (*a).to_owned()).collect();
        let mut connector = Connector::new(addresses, dialer, Backoff::new(BASE, CAP)).unwrap();
        let task = tokio::spawn(async move { connector.run(&mut state).await });
        (task, attempts, dir)
    }

    fn unavailable() -> SessionError {
        SessionError::Stream(Status::unavailable("connection refused"))
    }

    #[test]
    fn needs_an_address() {
        let (dialer, _) = fake::dialer();
        let backoff = Backoff::new(BASE, CAP);
        assert!(matches!(
            Connector::new(vec![], dialer, backoff),
            Err(ConnectorError::NoAddresses)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn rotates_through_replicas_with_capped_backoff() {
        let (_task, mut attempts, _dir) = start(&["a", "b", "c"]);
        let mut seen = Vec::new();
        let mut last: Option<Instant> = None;
        let mut ceiling = BASE;
        for _ in 0..8 {
            let attempt = attempts.recv().await.unwrap();
            if let Some(last) = last {
                let gap = attempt.at - last;
                assert!(gap <= ceiling, "gap {gap:?} above ceiling {ceiling:?}");
                ceiling = (ceiling * 2).min(CAP);
            }
            last = Some(attempt.at);
            seen.push(attempt.address.clone());
            attempt.fail(unavailable());
        }
        assert_eq!(seen, ["a", "b", "c", "a", "b", "c", "a", "b"]);
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_resets_after_a_session_that_received_an_update() {
        let (_task, mut attempts, _dir) = start(&["a", "b"]);
        // Fail enough times for the ceiling to reach the cap.
        for _ in 0..6 {
            attempts.recv().await.unwrap().fail(unavailable());
        }
        let (cp, mut agent) = attempts.recv().await.unwrap().accept();
        agent.next().await; // hello
        let full = RoutingUpdate {
            version: 1,
            full: true,
            region: "us-east".into(),
            ..Default::default()
        };
        cp.send(fake::update(full)).await.unwrap();
        assert_eq!(
            agent.next_non_heartbeat().await,
            agent_message::Kind::Ack(Ack { version: 1 })
        );
        let ended = Instant::now();
        drop(cp);
        let next = attempts.recv().await.unwrap();
        assert!(next.at - ended <= BASE, "waited {:?}", next.at - ended);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_hello_stops_the_loop() {
        let (task, mut attempts, _dir) = start(&["a", "b"]);
        attempts.recv().await.unwrap().fail(unavailable());
        attempts
            .recv()
            .await
            .unwrap()
            .fail(SessionError::from_status(Status::invalid_argument(
                "hello.region: must not be empty",
            )));
        let error = task.await.unwrap();
        let ConnectorError::Refused { address, .. } = &error else {
            panic!("{error:?}");
        };
        assert_eq!(address, "b");
        assert_eq!(
            crate::error_chain(&error),
            "control plane at b refused this agent: control plane refused the hello: \
             hello.region: must not be empty"
        );
    }
}
