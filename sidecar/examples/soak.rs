//! Runs the deterministic simulation over many seeds and reports the failing ones.
//!
//! `cargo run -p wallaroo-connector --release --example soak -- --seeds 100000 [--start 0] [--first]`
//! `cargo run -p wallaroo-connector --release --example soak -- --replay 1234 [--trace]` prints one seed's report
//! (with `--trace`, every event of the run).
use std::time::Instant;

use wallaroo_connector::sim::dst;

fn arg(args: &[String], name: &str) -> Option<u64> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(seed) = arg(&args, "--replay") {
        let mut cfg = dst::Config::from_seed(seed);
        cfg.full_trace = args.iter().any(|a| a == "--trace");
        let r = dst::run_config(cfg);
        if r.ok() {
            println!("seed {seed} passed after {} steps, hash {:016x} ({})", r.steps, r.hash, r.summary);
        } else {
            println!("{}", r.describe());
            std::process::exit(1);
        }
        return;
    }
    let seeds = arg(&args, "--seeds").unwrap_or(10_000);
    let start = arg(&args, "--start").unwrap_or(0);
    // Mutation testing: the first failing seed is all we need.
    let stop_first = args.iter().any(|a| a == "--first");
    let began = Instant::now();
    let mut failed = Vec::new();
    let mut steps = 0u64;
    for (i, seed) in (start..start + seeds).enumerate() {
        let r = dst::run(seed);
        steps += r.steps;
        if !r.ok() {
            println!("{}", r.describe());
            failed.push(seed);
            if stop_first {
                break;
            }
        }
        if (i + 1) % 10_000 == 0 {
            println!("{} seeds done, {} failed, {:.0?} elapsed", i + 1, failed.len(), began.elapsed());
        }
    }
    println!(
        "soak: {seeds} seeds from {start}, {} failed {:?}, {steps} steps, {:.1?}",
        failed.len(),
        &failed[..failed.len().min(50)],
        began.elapsed()
    );
    if !failed.is_empty() {
        std::process::exit(1);
    }
}
