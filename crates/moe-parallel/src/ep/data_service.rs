//! [`DataServiceTransport`]: the all-to-all over burn-communication's tensor data service,
//! one WebSocket server per rank on loopback (or any reachable address), peer to peer.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use burn::tensor::backend::Backend;
use burn_communication::data_service::{TensorDataServer, TensorDataService, TensorTransferId};
use burn_communication::websocket::{WebSocket, WsServer};
use burn_communication::{Address, ProtocolServer};
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;

use super::{EpError, RankTransport, WireMessage};

/// A port on 127.0.0.1 free at the time of the call (bind port 0, read it, release it), to
/// hand to a rank's data service without colliding with parallel tests.
pub fn free_loopback_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?.local_addr()?.port())
}

/// One rank's side of the all-to-all through burn-communication's `TensorDataService`, the
/// peer-to-peer tensor transfer that burn-collective's global level uses: the rank serves
/// what it sends on its own port (each message exposed once, for its one reader) and
/// downloads what the others send it from theirs. Ranks may be threads of one process or
/// processes; messages travel as host copies ([`WireMessage`]), so the autodiff graph stops
/// at the exchange. Every wait is bounded by the transport's timeout.
pub struct DataServiceTransport<B: Backend> {
    rank: usize,
    ports: Vec<u16>,
    device: B::Device,
    timeout: Duration,
    service: Arc<TensorDataService<B, WebSocket>>,
    cancel: CancellationToken,
    step: u64,
    peer_ready: Vec<bool>,
    bytes_sent: Vec<u64>,
    // Last, so that it is dropped after the token has stopped its tasks.
    runtime: Runtime,
}

impl<B: Backend> std::fmt::Debug for DataServiceTransport<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataServiceTransport").field("rank", &self.rank).field("ports", &self.ports).finish()
    }
}

/// A transfer id unique per step, source, destination and part.
fn transfer_id(step: u64, src: usize, dst: usize, part: usize) -> TensorTransferId {
    TensorTransferId::from((step << 40) | ((src as u64) << 24) | ((dst as u64) << 8) | part as u64)
}

impl<B: Backend> DataServiceTransport<B> {
    /// Starts rank `rank`'s data service on 127.0.0.1:`ports[rank]`; rank `r` is reached at
    /// `ports[r]`. Received tensors are put on `device`. Fails when the server is not
    /// accepting connections within `timeout`.
    pub fn new(rank: usize, ports: Vec<u16>, device: B::Device, timeout: Duration) -> Result<Self, EpError> {
        let ranks = ports.len();
        if rank >= ranks {
            return Err(EpError::RankCount { got: rank + 1, expected: ranks });
        }
        let fail = |reason: String| EpError::Transport { rank, peer: rank, reason };
        // One worker: the server and the downloads are I/O, and CI has two cores.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(|e| fail(format!("tokio runtime: {e}")))?;
        let cancel = CancellationToken::new();
        let service = Arc::new(TensorDataService::<B, WebSocket>::new(cancel.clone()));
        let server = WsServer::new(ports[rank]).route_tensor_data_service(service.clone());
        runtime.spawn(server.serve(cancel.clone().cancelled_owned()));
        // The service's handler can miss the wake-up of a tensor exposed between its lookup
        // and its wait; waking it periodically bounds that to one tick.
        let (ticker_service, ticker_cancel) = (service.clone(), cancel.clone());
        runtime.spawn(async move {
            while !ticker_cancel.is_cancelled() {
                tokio::time::sleep(Duration::from_millis(5)).await;
                ticker_service.new_tensor_notify.notify_waiters();
            }
        });
        let mut transport = Self {
            rank,
            ports,
            device,
            timeout,
            service,
            cancel,
            step: 0,
            peer_ready: vec![false; ranks],
            bytes_sent: vec![0; ranks],
            runtime,
        };
        transport.wait_for(rank)?;
        Ok(transport)
    }

    /// `[dst]` payload bytes (serialised tensor data) this rank has sent so far; nothing to
    /// itself.
    pub fn bytes_sent(&self) -> &[u64] {
        &self.bytes_sent
    }

    /// Waits until `peer`'s server accepts connections (once per peer).
    fn wait_for(&mut self, peer: usize) -> Result<(), EpError> {
        if self.peer_ready[peer] {
            return Ok(());
        }
        let address = SocketAddr::from((Ipv4Addr::LOCALHOST, self.ports[peer]));
        let deadline = Instant::now() + self.timeout;
        loop {
            if TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_ok() {
                self.peer_ready[peer] = true;
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(EpError::Transport {
                    rank: self.rank,
                    peer,
                    reason: format!("no data service at {address} after {:?}", self.timeout),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl<B: Backend> DataServiceTransport<B> {
    /// Waits until the peers have fetched everything this rank exposed, so that a rank that
    /// finishes first does not take its server down under a slower peer.
    fn wait_until_fetched(&self) -> Result<(), EpError> {
        let deadline = Instant::now() + self.timeout;
        loop {
            let left = self.runtime.block_on(async { self.service.exposed_tensors.lock().await.len() });
            if left == 0 {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(EpError::Transport {
                    rank: self.rank,
                    peer: self.rank,
                    reason: format!("step {}: {left} messages not fetched after {:?}", self.step, self.timeout),
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl<B: Backend> RankTransport<B> for DataServiceTransport<B> {
    fn rank(&self) -> usize {
        self.rank
    }

    fn num_ranks(&self) -> usize {
        self.ports.len()
    }

    fn exchange<M: WireMessage<B>>(&mut self, outgoing: Vec<M>) -> Result<Vec<M>, EpError> {
        let ranks = self.ports.len();
        if outgoing.len() != ranks {
            return Err(EpError::MessageCount { rank: self.rank, got: outgoing.len(), expected: ranks });
        }
        self.step += 1;
        let mut own = None;
        for (dst, message) in outgoing.into_iter().enumerate() {
            if dst == self.rank {
                own = Some(message);
                continue;
            }
            for (part, data) in message.into_wire().into_iter().enumerate() {
                self.bytes_sent[dst] += data.bytes.len() as u64;
                let id = transfer_id(self.step, self.rank, dst, part);
                self.runtime.block_on(self.service.expose_data(data, 1, id));
            }
        }
        let mut incoming = Vec::with_capacity(ranks);
        for src in 0..ranks {
            if src == self.rank {
                // `own` is set: `outgoing` had one message per rank.
                incoming.push(own.take().ok_or(EpError::MessageCount { rank: src, got: 0, expected: ranks })?);
                continue;
            }
            self.wait_for(src)?;
            let address: Address = format!("ws://127.0.0.1:{}", self.ports[src])
                .parse()
                .map_err(|reason| EpError::Transport { rank: self.rank, peer: src, reason })?;
            let mut parts = Vec::with_capacity(M::PARTS);
            for part in 0..M::PARTS {
                let id = transfer_id(self.step, src, self.rank, part);
                let download = self.service.download_tensor(address.clone(), id);
                let fail = |reason: String| EpError::Transport { rank: self.rank, peer: src, reason };
                let data = self
                    .runtime
                    .block_on(async { tokio::time::timeout(self.timeout, download).await })
                    .map_err(|_| fail(format!("step {} part {part}: nothing after {:?}", self.step, self.timeout)))?
                    .ok_or_else(|| fail(format!("step {} part {part}: the peer closed the connection", self.step)))?;
                parts.push(data);
            }
            incoming.push(M::from_wire(parts, &self.device)?);
        }
        self.wait_until_fetched()?;
        Ok(incoming)
    }
}

impl<B: Backend> Drop for DataServiceTransport<B> {
    fn drop(&mut self) {
        // Closes this rank's download connections properly (in a task: the service panics
        // on a peer that is already gone), then stops the server and the ticker; the
        // runtime's drop ends what is left.
        let service = self.service.clone();
        let closing = self.runtime.spawn(async move { service.close().await });
        let _ = self.runtime.block_on(async { tokio::time::timeout(Duration::from_secs(1), closing).await });
        self.cancel.cancel();
    }
}
