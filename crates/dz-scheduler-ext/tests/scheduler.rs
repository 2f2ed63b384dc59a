//! The Scheduler end to end with a fake backend: a simulated engine under budgets smaller than the
//! delta set, unregister during traffic, failed deltas, unknown names, concurrency, metrics.

mod common;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{Fake, Rng, BOUND};
use dz_scheduler_ext::{Decision, DeltaState, Scheduler, SchedulerOptions, Unregistered};

fn scheduler(fake: Fake, gpu: u64, cpu: u64, cap: usize) -> Scheduler<Fake> {
    Scheduler::new(
        fake,
        SchedulerOptions {
            max_deltas_per_step: cap,
            gpu_bytes: gpu,
            cpu_bytes: cpu,
            load_threads: 2,
            retry_after: Duration::from_secs(3600),
            ..SchedulerOptions::default()
        },
    )
    .unwrap()
}

#[test]
fn scheduler_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Scheduler<Fake>>();
}

#[test]
fn names_that_are_not_deltas_run_as_the_base() {
    let s = scheduler(Fake::new(100), 100, 100, 1);
    assert_eq!(s.admit(&[], &[Some("merged"), None], 2), [true, true]);
    assert_eq!(s.residency().state("merged"), DeltaState::Unknown);
}

/// A simulated engine over the real Scheduler: 4 slots, sequences of 3 steps, 5 deltas of which
/// the GPU holds 2 and the CPU cache 3, base and merged-model traffic mixed in. Loads really run
/// on the load threads; when nothing can run, the engine waits (bounded) for the next load.
#[test]
fn an_engine_under_budgets_smaller_than_the_delta_set_serves_everything() {
    let names = ["d0", "d1", "d2", "d3", "d4"];
    let s = scheduler(Fake::new(200), 200, 300, 2);
    for n in names {
        s.register(n, 100).unwrap();
    }
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        // Meanwhile, an admin registers and unregisters another delta and scrapes metrics.
        scope.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                s.register("hot", 50).unwrap();
                s.residency().request("hot");
                assert!(s.to_prometheus().contains("deltazip_scheduler_steps_total"));
                s.unregister("hot").unwrap();
            }
        });

        let mut rng = Rng::new(3);
        let mut running: Vec<(Option<&str>, usize)> = Vec::new();
        let mut waiting: VecDeque<Option<&str>> = VecDeque::new();
        let (mut sent, mut finished) = (0, 0);
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut step = 0;
        while step < 40 || !waiting.is_empty() || !running.is_empty() {
            assert!(
                Instant::now() < deadline,
                "the engine stopped making progress"
            );
            if step < 40 {
                for _ in 0..rng.below(3) {
                    waiting.push_back(match rng.below(7) {
                        0 => None,
                        1 => Some("merged"),
                        k => Some(names[k - 2]),
                    });
                    sent += 1;
                }
            }
            for r in &mut running {
                r.1 -= 1;
            }
            finished += running.iter().filter(|r| r.1 == 0).count();
            running.retain(|r| r.1 > 0);

            let run: Vec<Option<&str>> = running.iter().map(|r| r.0).collect();
            let wait: Vec<Option<&str>> = waiting.iter().copied().collect();
            let d = s.admit_decisions(&run, &wait, 4 - running.len());
            let mut still = VecDeque::new();
            for (w, d) in wait.into_iter().zip(d) {
                match d {
                    Decision::Admit => running.push((w, 3)),
                    Decision::Wait => still.push_back(w),
                    Decision::Refuse(m) => panic!("{w:?} refused: {m}"),
                }
            }
            waiting = still;
            // Every running sequence's delta is on the GPU and active: never evicted under it.
            let mut deltas: Vec<&str> = running.iter().filter_map(|r| r.0).collect();
            deltas.retain(|n| *n != "merged");
            deltas.dedup();
            for n in &deltas {
                assert!(
                    s.residency().device(n).is_some(),
                    "{n} evicted while running"
                );
                assert!(s.backend_active(n), "{n} not active while running");
            }
            assert!(
                deltas
                    .iter()
                    .collect::<std::collections::HashSet<_>>()
                    .len()
                    <= 2
            );
            if running.is_empty() {
                let loading = waiting
                    .iter()
                    .flatten()
                    .find(|n| s.residency().state(n) == DeltaState::Loading);
                if let Some(n) = loading {
                    // Nothing runs until a load lands: wait for it (bounded), no spinning.
                    s.residency()
                        .wait_until(n, BOUND, |st| *st != DeltaState::Loading);
                }
            }
            step += 1;
        }
        stop.store(true, Ordering::Relaxed);
        assert_eq!(finished, sent);
    });
    let m = s.metrics();
    println!("{m:#?}");
    assert!(m.residency.gpu.evictions > 0, "budgets forced no eviction");
    assert!(m.residency.gpu.loads > names.len() as u64, "no reloads");
    assert_eq!(m.admission.refused, 0);
    assert_eq!(s.residency().backend().violations(), Vec::<String>::new());
}

trait Active {
    fn backend_active(&self, name: &str) -> bool;
}

impl Active for Scheduler<Fake> {
    fn backend_active(&self, name: &str) -> bool {
        self.residency().backend().is_active(name)
    }
}

#[test]
fn unregister_during_traffic_drains_then_drops() {
    let s = scheduler(Fake::new(1000), 1000, 1000, 4);
    for n in ["a", "b"] {
        s.register(n, 100).unwrap();
        s.residency().request(n);
        assert_eq!(s.residency().wait(n, BOUND), DeltaState::Ready);
    }
    assert_eq!(s.admit(&[], &[Some("a"), Some("b")], 4), [true, true]);

    // a's sequence runs on; new ones for a are refused with a reason, b's are not affected.
    assert_eq!(s.unregister("a").unwrap(), Unregistered::Draining);
    let d = s.admit_decisions(&[Some("a"), Some("b")], &[Some("a"), Some("b")], 4);
    assert_eq!(
        d,
        [
            Decision::Refuse("delta \"a\" was unregistered".into()),
            Decision::Admit
        ]
    );
    assert!(s.backend_active("a"), "still serving its running sequence");
    // a's sequence ends: dropped at the next step.
    s.admit(&[Some("b"), Some("b")], &[], 4);
    assert!(!s.backend_active("a"));
    assert_eq!(s.residency().metrics().gpu.bytes_used, 100);
    s.register("a", 100).unwrap();
    assert_eq!(s.admit(&[], &[Some("a")], 4), [false], "loading again");
    assert_eq!(s.residency().wait("a", BOUND), DeltaState::Ready);
    assert_eq!(s.admit(&[], &[Some("a")], 4), [true]);
}

#[test]
fn a_delta_that_fails_to_load_refuses_its_sequences() {
    let fake = Fake::new(1000);
    fake.state()
        .fail_read
        .insert("bad".into(), "checksum mismatch".into());
    let s = scheduler(fake, 1000, 1000, 4);
    s.register("bad", 100).unwrap();
    assert_eq!(s.admit(&[], &[Some("bad"), None], 4), [false, true]);
    assert!(matches!(
        s.residency().wait("bad", BOUND),
        DeltaState::Failed(_)
    ));
    let d = s.admit_decisions(&[None], &[Some("bad")], 4);
    match &d[0] {
        Decision::Refuse(m) => assert!(m.contains("bad") && m.contains("checksum mismatch"), "{m}"),
        d => panic!("{d:?}"),
    }
    let text = s.to_prometheus();
    assert!(
        text.contains("deltazip_scheduler_refused_total 1"),
        "{text}"
    );
    assert!(
        text.contains("deltazip_delta_load_failures_total 1"),
        "{text}"
    );
}

#[test]
fn a_queued_load_proceeds_when_running_sequences_finish() {
    // GPU room for one delta; a runs, b's load waits, a's sequences end, b comes in.
    let s = scheduler(Fake::new(100), 100, 1000, 4);
    for n in ["a", "b"] {
        s.register(n, 100).unwrap();
    }
    assert_eq!(s.admit(&[], &[Some("a")], 2), [false]);
    assert_eq!(s.residency().wait("a", BOUND), DeltaState::Ready);
    assert_eq!(s.admit(&[], &[Some("a")], 2), [true]);
    assert_eq!(
        s.admit(&[Some("a")], &[Some("b"), Some("a")], 1),
        [false, true]
    );
    assert_eq!(s.residency().wait("b", BOUND), DeltaState::Queued);
    // While b waits for room a holds, a takes no new sequences (so it drains).
    assert_eq!(
        s.admit(&[Some("a")], &[Some("b"), Some("a")], 1),
        [false, false]
    );
    assert!(s.backend_active("a"));
    // a's sequences ended: b loads in its place.
    s.residency().set_running([]);
    assert_eq!(
        s.residency()
            .wait_until("b", BOUND, |st| *st == DeltaState::Ready),
        DeltaState::Ready
    );
    assert_eq!(s.admit(&[], &[Some("b"), Some("a")], 2), [true, false]);
    assert!(!s.backend_active("a"));
}
