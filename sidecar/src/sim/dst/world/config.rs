//! What a run is made of (all drawn from the seed) and what it reports.
use super::Rng;

/// Which faults a run may inject (each seed enables a random subset, so some runs stay simple).
#[derive(Debug, Clone, Copy, Default)]
pub struct Faults {
    pub src_drop: bool,
    pub sink_drop: bool,
    pub src_crash: bool,
    pub sink_crash: bool,
    pub worker_crash: bool,
    pub other_abort: bool,
    pub restart_other: bool,
    pub outage: bool,
    pub refuse: bool,
    pub gap: bool,
    pub phase2_noise: bool,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub seed: u64,
    pub workers: usize,
    pub records: Vec<u64>,
    pub max_credits: u32,
    pub refill_credits: u32,
    /// Faults stop after this step; then every stream must finish within `max_steps`.
    pub fault_steps: u64,
    pub max_steps: u64,
    /// The worker the source connector is configured to connect to.
    pub configured: usize,
    pub sink_attempts: u32,
    pub faults: Faults,
    /// Keep every event in the report's `tail`, not only the last ones (for replaying a failure).
    pub full_trace: bool,
}

impl Config {
    pub fn from_seed(seed: u64) -> Self {
        let mut r = Rng::new(seed ^ 0x0005_EED0_FD57);
        let workers = r.range(2, 3) as usize;
        let partitions = r.range(1, 4) as usize;
        let records = (0..partitions).map(|_| r.range(1, 30)).collect();
        let max_credits = r.range(3, 24) as u32;
        let refill_credits = r.range(1, u64::from(max_credits / 2).max(1)) as u32;
        let fault_steps = r.range(100, 1500);
        let mut f = || r.chance(1, 2);
        let faults = Faults {
            src_drop: f(),
            sink_drop: f(),
            src_crash: f(),
            sink_crash: f(),
            worker_crash: f(),
            other_abort: f(),
            restart_other: f(),
            outage: f(),
            refuse: f(),
            gap: f(),
            phase2_noise: f(),
        };
        let configured = r.below(workers as u64) as usize;
        Self {
            seed,
            workers,
            records,
            max_credits,
            refill_credits,
            fault_steps,
            max_steps: fault_steps + 40_000,
            configured,
            sink_attempts: 3,
            faults,
            full_trace: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub step: u64,
    pub what: String,
}

/// What a run produced: `violations` empty means it passed.
#[derive(Debug, Clone)]
pub struct Report {
    pub seed: u64,
    pub steps: u64,
    /// Hash of every step's event: equal for two runs of one seed.
    pub hash: u64,
    pub violations: Vec<Violation>,
    /// The last events before the end (or the first violation), for the failure message.
    pub tail: Vec<String>,
    pub summary: String,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.violations.is_empty()
    }

    /// A failure message naming the seed, the step and how to replay it.
    pub fn describe(&self) -> String {
        let mut s = format!("seed {} failed after {} steps ({})\n", self.seed, self.steps, self.summary);
        for v in self.violations.iter().take(10) {
            s.push_str(&format!("  step {}: {}\n", v.step, v.what));
        }
        s.push_str("  last events:\n");
        for t in &self.tail {
            s.push_str(&format!("    {t}\n"));
        }
        s.push_str(&format!("  replay: wallaroo_connector::sim::dst::run({})\n", self.seed));
        s
    }
}
