//! Times one all-to-all of token rows between ranks in threads through
//! `DataServiceTransport` (burn-communication's tensor data service on 127.0.0.1).
//!
//! `cargo run --release -p moe-parallel --example ep_loopback_exchange -- [ranks] [rows] [d]`

use std::thread;
use std::time::{Duration, Instant};

use burn::backend::NdArray;
use burn::tensor::{Distribution, Tensor};
use moe_parallel::ep::{CombineMessage, DataServiceTransport, RankTransport, free_loopback_port};

type B = NdArray;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<usize> = std::env::args().skip(1).map(|a| a.parse()).collect::<Result<_, _>>()?;
    let (ranks, rows, d) = (*args.first().unwrap_or(&2), *args.get(1).unwrap_or(&1024), *args.get(2).unwrap_or(&1024));
    let ports: Vec<u16> = (0..ranks).map(|_| free_loopback_port()).collect::<Result<_, _>>()?;
    let repeats = 5;
    let times: Vec<Result<Duration, String>> = thread::scope(|scope| {
        let handles: Vec<_> = (0..ranks)
            .map(|rank| {
                let ports = ports.clone();
                scope.spawn(move || {
                    let device = Default::default();
                    let mut transport = DataServiceTransport::<B>::new(rank, ports, device, Duration::from_secs(60))
                        .map_err(|e| e.to_string())?;
                    let rows_to = |_| Tensor::<B, 2>::random([rows, d], Distribution::Default, &device);
                    // One warm-up exchange opens the connections.
                    let mut best = Duration::MAX;
                    for _ in 0..=repeats {
                        let outgoing = (0..ranks).map(|dst| CombineMessage { rows: Some(rows_to(dst)) }).collect();
                        let start = Instant::now();
                        transport.exchange(outgoing).map_err(|e| e.to_string())?;
                        best = best.min(start.elapsed());
                    }
                    Ok(best)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("rank panicked".into()))).collect()
    });
    let slowest = times.into_iter().collect::<Result<Vec<_>, _>>()?.into_iter().max().unwrap_or_default();
    let bytes_per_rank = ((ranks - 1) * rows * d * 4) as f64;
    println!(
        "{ranks} ranks, {rows} x {d} f32 rows to each peer: best all-to-all {:.2} ms, {:.1} MB sent per rank, {:.2} GB/s per rank",
        slowest.as_secs_f64() * 1e3,
        bytes_per_rank / 1e6,
        bytes_per_rank / slowest.as_secs_f64() / 1e9
    );
    Ok(())
}
