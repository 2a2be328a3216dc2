//! Ranks in their own threads and processes, exchanging through the tensor data service and
//! all-reducing through burn-collective, against the single-device layer.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::thread;
use std::time::{Duration, Instant};

use burn::backend::{Autodiff, NdArray};
use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::{Tensor, TensorData, backend::Backend};
use burn_collective::{CollectiveConfig, PeerId, finish_collective, register, reset_collective};
use moe_experts::{MoeBackend, MoeLayer, MoeLayerConfig};
use moe_router::RouterConfig;

use super::*;
use crate::Placement;

type B = NdArray;
type A = Autodiff<NdArray>;

/// Every network wait in these tests gives up after this.
const TIMEOUT: Duration = Duration::from_secs(30);

/// These tests take free loopback ports (free when asked, not reserved) and burn-collective's
/// process-wide state, so they run one at a time: run side by side, one test's outbound
/// connections could take a port another had just picked (a CI run timed out that way).
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Holds [`ONE_AT_A_TIME`] for the calling test; a failed test's poison does not stop the rest.
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
const D: usize = 16;
const E: usize = 8;

/// Values from a hash of the index and a seed, in `[-scale, scale]`: the same in every
/// process, without a shared random generator.
fn hashed(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    (0..n as u64)
        .map(|i| {
            let h =
                (i.wrapping_mul(2_654_435_761) ^ seed.wrapping_mul(40_503)).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
            scale * ((h % 20_001) as f32 / 10_000.0 - 1.0)
        })
        .collect()
}

/// Replaces every float parameter with hashed values (keeping whether it is trained).
struct HashedInit {
    next: u64,
}

impl<Bk: Backend> ModuleMapper<Bk> for HashedInit {
    fn map_float<const N: usize>(&mut self, param: Param<Tensor<Bk, N>>) -> Param<Tensor<Bk, N>> {
        let (id, tensor, mapper) = param.consume();
        let (shape, trained, device) = (tensor.shape(), tensor.is_require_grad(), tensor.device());
        self.next += 1;
        let values = hashed(self.next, shape.num_elements(), 0.4);
        let fresh = Tensor::from_data(TensorData::new(values, shape), &device);
        Param::from_mapped_value(id, if trained { fresh.require_grad() } else { fresh }, mapper)
    }
}

/// A layer with 4 groups of 2 experts, 2 kept: on 2 or 4 nodes a token reaches at most 2.
fn layer<Bk: MoeBackend>(device: &Bk::Device) -> MoeLayer<Bk> {
    let router = RouterConfig::new(D, E, 3).with_num_groups(4).with_topk_groups(2);
    MoeLayerConfig::new(router, 12).with_num_shared(1).init::<Bk>(device).unwrap().map(&mut HashedInit { next: 0 })
}

fn tokens<Bk: Backend>(count: usize, device: &Bk::Device) -> Tensor<Bk, 2> {
    Tensor::from_data(TensorData::new(hashed(7, count * D, 1.0), [count, D]), device)
}

fn split_rows<Bk: Backend>(x: &Tensor<Bk, 2>, split: &[usize]) -> Vec<Tensor<Bk, 2>> {
    let mut start = 0;
    split
        .iter()
        .map(|&n| {
            let part = x.clone().slice([start..start + n, 0..D]);
            start += n;
            part
        })
        .collect()
}

fn ports(ranks: usize) -> Vec<u16> {
    (0..ranks).map(|_| free_loopback_port().unwrap()).collect()
}

fn max_abs_diff<Bk: Backend>(a: Tensor<Bk, 2>, b: Tensor<Bk, 2>) -> f32 {
    let diff: Vec<f32> = (a - b).abs().into_data().iter::<f32>().collect();
    diff.into_iter().fold(0.0, f32::max)
}

fn cat_nonempty<Bk: Backend>(parts: Vec<Tensor<Bk, 2>>) -> Tensor<Bk, 2> {
    Tensor::cat(parts.into_iter().filter(|t| t.dims()[0] > 0).collect(), 0)
}

#[test]
fn ranks_on_threads_equal_the_single_device_layer() {
    let _serial = one_at_a_time();
    let device = Default::default();
    let layer = layer::<B>(&device);
    // R = 2 on 2 nodes; R = 4 on 2 nodes with uneven splits and an empty rank.
    for (ranks, nodes, split) in [(2, 2, vec![7, 13]), (4, 2, vec![5, 0, 9, 6])] {
        let total: usize = split.iter().sum();
        let x = tokens::<B>(total, &device);
        let reference = layer.forward_loop(x.clone().reshape([1, total, D])).unwrap().reshape([total, D]);
        let placement = Placement::new(E, ranks, nodes).unwrap();
        let ep = ExpertParallelMoe::from_layer(&layer, placement).unwrap();
        assert_eq!(ep.node_limit(), Some(2));
        let inputs = split_rows(&x, &split);
        let (local, local_accounting) = ep.forward_with_accounting(inputs.clone(), &mut LocalTransport::new()).unwrap();
        let ports = ports(ranks);
        let results: Vec<_> = thread::scope(|scope| {
            let handles: Vec<_> = inputs
                .iter()
                .enumerate()
                .map(|(rank, x)| {
                    let (ep, x, ports) = (ep.clone(), x.clone(), ports.clone());
                    scope.spawn(move || {
                        let mut transport = DataServiceTransport::<B>::new(rank, ports, Default::default(), TIMEOUT)?;
                        let (y, accounting) = ep.forward_rank(x, &mut transport)?;
                        Ok::<_, EpError>((y, accounting, transport.bytes_sent().to_vec()))
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap().unwrap()).collect()
        });
        let mut outputs = Vec::new();
        let mut accountings = Vec::new();
        let mut bytes_sent = Vec::new();
        for (rank, (y, accounting, bytes)) in results.into_iter().enumerate() {
            assert_eq!(y.dims(), [split[rank], D]);
            outputs.push(y);
            accountings.push(accounting);
            bytes_sent.push(bytes);
        }
        // src -> dst carries src's dispatched rows and the combined rows of dst's tokens that
        // src computed, as f32, plus routing metadata.
        for (src, sent) in bytes_sent.iter().enumerate() {
            for (dst, &bytes) in sent.iter().enumerate() {
                let rows = accountings[src].rows_to[dst] + accountings[dst].rows_to[src];
                let payload = rows * (D as u64) * 4;
                if src == dst {
                    assert_eq!(bytes, 0);
                } else {
                    assert!(bytes >= payload, "R {ranks}: {src} -> {dst}: {bytes} bytes for {rows} rows");
                }
            }
        }
        let diff = max_abs_diff(cat_nonempty(outputs.clone()), reference);
        assert!(diff < 1e-5, "R {ranks}: max |diff| {diff}");
        assert_eq!(max_abs_diff(cat_nonempty(outputs), cat_nonempty(local)), 0.0);
        let step = StepAccounting::from_ranks(&placement, &accountings).unwrap();
        assert_eq!(step, local_accounting);
        assert!(step.max_nodes_reached() <= 2);
        assert_eq!(step.nodes_reached.iter().sum::<u64>(), total as u64);
        assert_eq!(step.pairs_per_rank.iter().sum::<u64>(), 3 * total as u64);
    }
}

/// What a rank reports, flattened, in this order: its output and its input's, the summed
/// replicated parameters' (router, shared gate, up, down) and its routed experts' `down`
/// gradients, all under the loss `sum(y^2)` over all tokens.
const PARTS: [&str; 7] = [
    "output",
    "input grad",
    "router grad",
    "shared gate grad",
    "shared up grad",
    "shared down grad",
    "routed down grad",
];

fn flat<Bk: Backend, const N: usize>(t: Tensor<Bk, N>) -> Vec<f32> {
    t.into_data().iter::<f32>().collect()
}

/// The replicated parameters with gradients: the router's weight and the shared experts'.
fn replicated<Bk: Backend>(
    router: &moe_router::TopKRouter<Bk>,
    shared: &moe_experts::SwiGlu<Bk>,
) -> [Param<Tensor<Bk, 2>>; 4] {
    [router.weight.clone(), shared.gate.clone(), shared.up.clone(), shared.down.clone()]
}

/// The single-device layer's [`PARTS`] for each rank of `split` over `ranks` ranks.
fn reference(layer: &MoeLayer<A>, split: &[usize]) -> Vec<Vec<Vec<f32>>> {
    let total: usize = split.iter().sum();
    let x = tokens::<A>(total, &Default::default()).require_grad();
    let y = layer.forward_loop(x.clone().reshape([1, total, D])).unwrap().reshape([total, D]);
    let grads = y.clone().powi_scalar(2).sum().backward();
    let (y, x_grad) = (flat(y.inner()), flat(x.grad(&grads).unwrap()));
    let summed: Vec<Vec<f32>> = replicated(&layer.router, layer.shared.as_ref().unwrap())
        .iter()
        .map(|p| flat(p.grad(&grads).unwrap()))
        .collect();
    let down = flat(layer.experts.down.grad(&grads).unwrap());
    let per_rank = down.len() / split.len();
    let mut start = 0;
    split
        .iter()
        .enumerate()
        .map(|(rank, &n)| {
            let rows = start * D..(start + n) * D;
            start += n;
            let mut parts = vec![y[rows.clone()].to_vec(), x_grad[rows].to_vec()];
            parts.extend(summed.iter().cloned());
            parts.push(down[rank * per_rank..(rank + 1) * per_rank].to_vec());
            parts
        })
        .collect()
}

/// One rank's training step: traced forward, `sum(y^2)` backward, the backward through the
/// exchanges, the all-reduce of the replicated gradients; returns its [`PARTS`].
fn rank_step(
    ep: &ExpertParallelMoe<A>,
    rank: usize,
    x: Tensor<A, 2>,
    transport: &mut DataServiceTransport<A>,
) -> Result<Vec<Vec<f32>>, String> {
    let x = x.detach().require_grad();
    let (y, _, tape) = ep.forward_rank_traced(x.clone(), transport).map_err(|e| e.to_string())?;
    let loss_grads = y.clone().powi_scalar(2).sum().backward();
    let mut grads = ep.backward_rank(tape, loss_grads, transport).map_err(|e| e.to_string())?;
    let x_grad = grads.grad(&x).map_or_else(|| vec![0.0; x.dims()[0] * D], flat);
    let down = ep.shards[rank].down.val();
    let down_grad = grads.grad(&down).map_or_else(|| vec![0.0; down.shape().num_elements()], flat);
    let synced = all_reduce_replicated_grads(PeerId::from(rank), ep, &mut grads).map_err(|e| e.to_string())?;
    let mut parts = vec![flat(y.inner()), x_grad];
    for p in replicated(&ep.router, ep.shared.as_ref().unwrap()) {
        parts.push(flat(
            synced.get::<B, 2>(p.id).ok_or_else(|| format!("rank {rank}: no summed gradient for {}", p.id))?,
        ));
    }
    parts.push(down_grad);
    Ok(parts)
}

fn assert_parts_close(got: &[Vec<f32>], want: &[Vec<f32>], what: &str) {
    assert_eq!(got.len(), PARTS.len(), "{what}");
    for ((g, w), name) in got.iter().zip(want).zip(PARTS) {
        assert_eq!(g.len(), w.len(), "{what}: {name} length");
        let scale = w.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1.0);
        let diff = g.iter().zip(w).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(diff <= 1e-5 * scale, "{what}: {name}: max |diff| {diff} (scale {scale})");
    }
}

#[test]
fn gradients_on_threads_equal_the_single_device_layer() {
    let _serial = one_at_a_time();
    let device = Default::default();
    let single = layer::<A>(&device);
    for (ranks, nodes, split) in [(2, 2, vec![8, 12]), (4, 2, vec![6, 0, 9, 5])] {
        let total: usize = split.iter().sum();
        let want = reference(&single, &split);
        let placement = Placement::new(E, ranks, nodes).unwrap();
        let inputs = split_rows(&tokens::<A>(total, &device), &split);
        let ports = ports(ranks);
        let results: Vec<Result<Vec<Vec<f32>>, String>> = thread::scope(|scope| {
            let handles: Vec<_> = inputs
                .iter()
                .enumerate()
                .map(|(rank, x)| {
                    let (x, ports) = (x.clone(), ports.clone());
                    scope.spawn(move || {
                        // Each rank owns its parameters (same values): autodiff leaves shared
                        // between threads that run backward passes at once lose gradients.
                        let ep = ExpertParallelMoe::from_layer(&layer::<A>(&Default::default()), placement)
                            .map_err(|e| e.to_string())?;
                        let config = CollectiveConfig::default().with_num_devices(ranks);
                        register::<B>(PeerId::from(rank), Default::default(), config).map_err(|e| format!("{e:?}"))?;
                        let mut transport = DataServiceTransport::<A>::new(rank, ports, Default::default(), TIMEOUT)
                            .map_err(|e| e.to_string())?;
                        let parts = rank_step(&ep, rank, x, &mut transport);
                        finish_collective::<B>(PeerId::from(rank)).map_err(|e| format!("{e:?}"))?;
                        parts
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        reset_collective::<B>();
        for (rank, parts) in results.into_iter().enumerate() {
            assert_parts_close(&parts.unwrap(), &want[rank], &format!("R {ranks}, rank {rank}"));
        }
    }
}

// ---- Two processes on loopback, with burn-collective's global orchestrator ----

const CHILD_RANK: &str = "MOE_EP_CHILD_RANK";
const CHILD_PORTS: &str = "MOE_EP_CHILD_PORTS";
const CHILD_OUT: &str = "MOE_EP_CHILD_OUT";
const TEST_NAME: &str = "ep::distributed_tests::two_processes_on_loopback_equal_one_process";
const SPLIT: [usize; 2] = [9, 11];

/// Little-endian `f32`s.
fn read_f32s(path: &Path) -> Vec<f32> {
    std::fs::read(path).unwrap().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// One process = one node with one rank: the all-to-all through the data service, the
/// replicated gradients through burn-collective's global all-reduce.
fn run_child(rank: usize, ports: &[u16], out: &Path) {
    let (data_ports, orchestrator, collective_ports) = (&ports[0..2], ports[2], &ports[3..5]);
    let device = Default::default();
    let layer = layer::<A>(&device);
    let ep = ExpertParallelMoe::from_layer(&layer, Placement::new(E, 2, 2).unwrap()).unwrap();
    let x = split_rows(&tokens::<A>(SPLIT.iter().sum(), &device), &SPLIT).swap_remove(rank);
    let address = |port: u16| format!("ws://127.0.0.1:{port}").parse().unwrap();
    let config = CollectiveConfig::default()
        .with_num_devices(1)
        .with_num_nodes(2)
        .with_global_address(address(orchestrator))
        .with_node_address(address(collective_ports[rank]))
        .with_data_service_port(collective_ports[rank]);
    register::<B>(PeerId::from(rank), device, config).unwrap();
    let mut transport = DataServiceTransport::<A>::new(rank, data_ports.to_vec(), device, TIMEOUT).unwrap();
    let parts = rank_step(&ep, rank, x, &mut transport).unwrap();
    finish_collective::<B>(PeerId::from(rank)).unwrap();
    let bytes: Vec<u8> = parts.concat().into_iter().flat_map(f32::to_le_bytes).collect();
    std::fs::write(out, bytes).unwrap();
}

fn wait_or_kill(mut child: Child, deadline: Instant) -> bool {
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status.success(),
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(50)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
        }
    }
}

#[test]
fn two_processes_on_loopback_equal_one_process() {
    let _serial = one_at_a_time();
    if let Ok(rank) = std::env::var(CHILD_RANK) {
        let ports: Vec<u16> = std::env::var(CHILD_PORTS).unwrap().split(',').map(|p| p.parse().unwrap()).collect();
        run_child(rank.parse().unwrap(), &ports, &PathBuf::from(std::env::var(CHILD_OUT).unwrap()));
        return;
    }
    // Two data-service ports, the orchestrator's, two collective data-service ports.
    let ports = ports(5);
    let orchestrator = ports[2];
    thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        // Runs until the test process exits.
        runtime.block_on(burn_collective::start_global_orchestrator(orchestrator));
    });
    let dir = std::env::temp_dir().join(format!("moe-ep-two-processes-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let list = ports.iter().map(u16::to_string).collect::<Vec<_>>().join(",");
    let exe = std::env::current_exe().unwrap();
    let children: Vec<(Child, PathBuf)> = (0..2)
        .map(|rank| {
            let out = dir.join(format!("rank{rank}.f32"));
            let child = Command::new(&exe)
                .args(["--exact", TEST_NAME, "--nocapture", "--test-threads=1"])
                .env(CHILD_RANK, rank.to_string())
                .env(CHILD_PORTS, &list)
                .env(CHILD_OUT, &out)
                .spawn()
                .unwrap();
            (child, out)
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    let want = reference(&layer::<A>(&Default::default()), &SPLIT);
    for (rank, (child, out)) in children.into_iter().enumerate() {
        assert!(wait_or_kill(child, deadline), "rank {rank}'s process failed or timed out");
        let mut values = read_f32s(&out).into_iter();
        let got: Vec<Vec<f32>> = want[rank].iter().map(|w| values.by_ref().take(w.len()).collect()).collect();
        assert_eq!(values.next(), None, "rank {rank} wrote more than expected");
        assert_parts_close(&got, &want[rank], &format!("process {rank}"));
    }
    let _ = std::fs::remove_dir_all(&dir);
}
