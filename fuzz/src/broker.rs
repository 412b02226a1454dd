//! The LLMP broker of a `--cores` campaign: it forwards inputs between the clients of this
//! machine and, with `--remote-broker`, to and from another campaign's broker.
//!
//! LibAFL 0.16.1's `Launcher::launch` starts its broker with no remote address (it passes
//! `None` to `connect_b2b`'s caller; only the centralized launcher uses
//! `remote_broker_addr`), so the option was silently ignored. This module runs the broker
//! itself, in the campaign's main process, after the Launcher has forked the clients.
//!
//! The broker stops when every client of this machine has returned (counted in
//! [`Shared`]). LibAFL's own exit rule, "no client connected", never holds once a remote
//! broker is connected: the connection is registered as one more client.

use std::net::SocketAddr;
use std::time::Duration;

use libafl::Error;
use libafl::events::StdLlmpEventHook;
use libafl_bolts::llmp::{LlmpBroker, LlmpBrokerInner};
use libafl_bolts::shmem::{ShMem, ShMemProvider};
use libafl_bolts::tuples::tuple_list;

use crate::executor;
use crate::input::NmiInput;
use crate::stats::Shared;
use crate::status::StatusMonitor;

/// Pause between two passes over the clients' pages (LibAFL's own broker sleeps as long).
const IDLE: Duration = Duration::from_millis(5);

/// What the broker needs.
pub struct Broker<SP> {
    /// Shared memory for its pages.
    pub shmem: SP,
    /// Prints the campaign's status lines from the clients' events.
    pub monitor: StatusMonitor,
    /// The loopback port the clients connect to.
    pub port: u16,
    /// Another campaign's broker to exchange inputs with.
    pub remote: Option<SocketAddr>,
    /// How many clients this machine runs.
    pub clients: usize,
}

impl<SP: ShMemProvider> Broker<SP> {
    /// Brokers until every client has returned. SIGINT (see
    /// [`executor::install_sigint_handler`]) asks the clients to stop, and the broker goes on
    /// until they have.
    pub fn run(self, shared: &Shared) -> Result<(), Error> {
        let hook = StdLlmpEventHook::<NmiInput, _>::new(self.monitor)?;
        let mut broker =
            LlmpBroker::create_attach_to_tcp(self.shmem, tuple_list!(hook), self.port)?;
        let mut remote = self.remote;
        while shared.finished() < self.clients {
            if executor::interrupted() {
                shared.request_stop();
            }
            broker.broker_once()?;
            if let Some(address) = remote.take_if(|_| registered(broker.inner()) >= self.clients) {
                broker.inner_mut().connect_b2b(address).map_err(|e| {
                    Error::illegal_argument(format!(
                        "cannot connect to the remote broker {address}: {e}"
                    ))
                })?;
                println!("INFO: connected to the remote broker {address}");
            }
            std::thread::sleep(IDLE);
        }
        // Forward what the clients sent last (their final progress reports).
        broker.broker_once()?;
        Ok(())
    }
}

/// How many clients the broker has registered so far.
///
/// This decides when to connect to the remote broker. LLMP messages carry the sender's
/// id, and a client drops the messages that carry its own. The clients get their ids (1, 2,
/// ...) from the broker's TCP listener, but `connect_b2b` gives the proxy of the remote
/// broker the broker's next id of its own count (listener 0, then each client registered),
/// which is client 1's id if it connects first: then client 1 dropped every input from the
/// remote broker, and the proxy dropped every input of client 1 instead of forwarding it.
/// After all the clients are registered, the proxy's id is N+1, which no client has (a
/// respawned client keeps its id and does not connect again).
fn registered<SHM, SP>(broker: &LlmpBrokerInner<SHM, SP>) -> usize
where
    SHM: ShMem,
    SP: ShMemProvider<ShMem = SHM>,
{
    // The listener thread is the broker's own first client.
    (broker.peek_next_client_id().0 as usize).saturating_sub(1)
}
