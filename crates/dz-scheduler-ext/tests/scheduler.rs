//! The Scheduler end to end with a fake backend: a simulated engine under budgets smaller than the
//! delta set, unregister during traffic (drain: sequences in flight, set aside by the host or not,
//! finish with the delta), failed deltas, unknown names, concurrency, metrics.

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

/// `drop_draining`: a caller that knows nothing is in flight (a server with no request open, whose
/// engine went idle without a step that would unpin) drops the draining deltas at once; others, pinned
/// or not, stay.
#[test]
fn drop_draining_drops_only_the_draining_deltas() {
    let s = scheduler(Fake::new(1000), 1000, 1000, 4);
    for n in ["a", "b"] {
        s.register(n, 100).unwrap();
        s.residency().request(n);
        assert_eq!(s.residency().wait(n, BOUND), DeltaState::Ready);
    }
    assert_eq!(s.admit(&[], &[Some("a"), Some("b")], 4), [true, true]);
    // Pinned by the last step, and no step comes: without drop_draining it would stay.
    assert_eq!(s.unregister("a").unwrap(), Unregistered::Draining);
    assert_eq!(s.residency().drop_draining(), 1);
    assert!(!s.backend_active("a"));
    assert_eq!(s.residency().state("a"), DeltaState::Unregistered);
    assert!(s.backend_active("b"), "a delta not draining stays");
    assert_eq!(s.residency().state("b"), DeltaState::Ready);
    assert_eq!(s.residency().metrics().gpu.bytes_used, 100);
    assert_eq!(s.residency().drop_draining(), 0);
    // The name can come back at once.
    s.register("a", 100).unwrap();
}

/// Unregistering a delta that sequences in flight use drains it: every sequence admitted before the
/// unregister runs on with it to the end, in the batch or set aside by the host between steps (the
/// host reports those among `running`: seam 5), for as many steps as it takes; a sequence asked about
/// after the unregister has not started and is refused; once the last one finishes, the delta
/// leaves every tier.
#[test]
fn unregister_during_traffic_drains_the_sequences_in_flight_then_drops() {
    let s = scheduler(Fake::new(1000), 1000, 1000, 4);
    for n in ["a", "b"] {
        s.register(n, 100).unwrap();
        s.residency().request(n);
        assert_eq!(s.residency().wait(n, BOUND), DeltaState::Ready);
    }
    // a1, a2 and b1 start.
    assert_eq!(
        s.admit(&[], &[Some("a"), Some("a"), Some("b")], 4),
        [true, true, true]
    );
    assert_eq!(s.unregister("a").unwrap(), Unregistered::Draining);
    assert_eq!(s.residency().state("a"), DeltaState::Draining);
    let unregistered = || Decision::Refuse("delta \"a\" was unregistered".into());

    // The host set a2 aside (another length bucket ran): a1 and a2 are in flight. a3 arrives: it is
    // new to the unregistered delta and refused; b's are not affected.
    let d = s.admit_decisions(
        &[Some("a"), Some("b"), Some("a")],
        &[Some("a"), Some("b")],
        4,
    );
    assert_eq!(d, [unregistered(), Decision::Admit]);
    // Both a's set aside, no a in the batch, for several steps (the issue: a host that asked about
    // them again got them refused mid-stream): a stays on the GPU and active for them.
    for _ in 0..3 {
        assert_eq!(
            s.admit_decisions(&[Some("b"), Some("b"), Some("a"), Some("a")], &[None], 4),
            [Decision::Admit]
        );
        assert!(s.backend_active("a"), "dropped under sequences in flight");
        assert_eq!(s.residency().state("a"), DeltaState::Draining);
    }
    // a1 finished, a2 back in the batch: still there; a new a is still refused.
    let d = s.admit_decisions(&[Some("a"), Some("b"), Some("b")], &[Some("a")], 4);
    assert_eq!(d, [unregistered()]);
    assert!(s.backend_active("a"));
    assert!(matches!(
        s.register("a", 100),
        Err(dz_scheduler_ext::Error::StillDraining { .. })
    ));
    // a2 finished: dropped at the next step, GPU bytes freed.
    s.admit(&[Some("b"), Some("b")], &[None], 4);
    assert!(!s.backend_active("a"));
    assert_eq!(s.residency().state("a"), DeltaState::Unregistered);
    assert_eq!(s.residency().metrics().gpu.bytes_used, 100);
    assert_eq!(
        s.admit_decisions(&[Some("b")], &[Some("a")], 4),
        [unregistered()],
        "gone"
    );
    // The name can come back.
    s.register("a", 100).unwrap();
    assert_eq!(s.admit(&[], &[Some("a")], 4), [false], "loading again");
    assert_eq!(s.residency().wait("a", BOUND), DeltaState::Ready);
    assert_eq!(s.admit(&[], &[Some("a")], 4), [true]);
}

/// A sequence set aside between steps is in flight: its delta stays pinned, so a load that needs
/// its room waits (queued) until the sequence finishes, instead of evicting the delta under it.
#[test]
fn a_set_aside_sequence_keeps_its_delta_on_the_gpu() {
    // GPU room for one delta.
    let s = scheduler(Fake::new(100), 100, 1000, 4);
    for n in ["a", "b"] {
        s.register(n, 100).unwrap();
    }
    assert_eq!(s.admit(&[], &[Some("a")], 2), [false]);
    assert_eq!(s.residency().wait("a", BOUND), DeltaState::Ready);
    assert_eq!(s.admit(&[], &[Some("a")], 2), [true]);
    // a's sequence is set aside (reported as running); b asks for the GPU: its load waits.
    assert_eq!(s.admit(&[Some("a")], &[Some("b")], 2), [false]);
    assert_eq!(s.residency().wait("b", BOUND), DeltaState::Queued);
    for _ in 0..3 {
        assert_eq!(s.admit(&[Some("a")], &[Some("b")], 2), [false]);
        assert!(s.backend_active("a"), "evicted under a sequence in flight");
    }
    // a's sequence finished: b loads in its place.
    s.residency().set_running([]);
    assert_eq!(
        s.residency()
            .wait_until("b", BOUND, |st| *st == DeltaState::Ready),
        DeltaState::Ready
    );
    assert_eq!(s.admit(&[], &[Some("b")], 2), [true]);
    assert!(!s.backend_active("a"));
}

/// One simulated sequence: its fine-tune, arrival order, decode steps left and steps done (the
/// host's length bucketing key).
#[derive(Debug, Clone)]
struct Seq {
    name: Option<&'static str>,
    id: usize,
    left: usize,
    done: usize,
}

/// A simulated host engine that sets sequences aside between steps as mistral.rs's length bucketing
/// does (only the sequences at the oldest one's position run; the others wait a step, in flight,
/// reported among `running`), under budgets smaller than the delta set, and a delta unloaded in the
/// middle of the traffic while its sequences are set aside. Every sequence admitted before the
/// unload runs to its end with the delta on the GPU at every step it runs; every other sequence of
/// the unloaded delta (waiting at the unload, or arriving after it) is refused; the delta is dropped
/// once its last sequence finishes; every other sequence is served.
#[test]
fn an_engine_that_sets_sequences_aside_drains_an_unloaded_delta() {
    const SLOTS: usize = 4;
    let names = ["d0", "d1", "d2", "victim"];
    let s = scheduler(Fake::new(200), 200, 300, 2);
    for n in names {
        s.register(n, 100).unwrap();
    }
    let mut rng = Rng::new(11);
    let (mut running, mut aside) = (Vec::<Seq>::new(), Vec::<Seq>::new());
    let mut waiting = VecDeque::<Seq>::new();
    let (mut sent, mut next_id) = (0, 0);
    let mut finished = std::collections::HashSet::new();
    let mut refused = Vec::<Seq>::new();
    // Victim sequences admitted before the unload; the step of the unload.
    let mut started_victims = std::collections::HashSet::new();
    let mut unloaded_at: Option<usize> = None;
    let mut victim_aside_while_draining = 0;
    // A victim sequence sent after the unload (the random arrivals may end before the unload happens:
    // the loads run on threads, so how many steps pass before it depends on the machine's load).
    let mut victim_after_unload = false;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut step = 0;
    while step < 60 || !waiting.is_empty() || !running.is_empty() || !aside.is_empty() {
        assert!(
            Instant::now() < deadline,
            "the engine stopped making progress"
        );
        if unloaded_at.is_some() && !victim_after_unload {
            waiting.push_back(Seq {
                name: Some("victim"),
                id: next_id,
                left: 2,
                done: 0,
            });
            next_id += 1;
            sent += 1;
            victim_after_unload = true;
        }
        if step < 60 {
            for _ in 0..rng.below(3) {
                let name = match rng.below(6) {
                    0 => None,
                    1 | 2 => Some("victim"),
                    k => Some(names[k - 3]),
                };
                let left = 2 + rng.below(5);
                waiting.push_back(Seq {
                    name,
                    id: next_id,
                    left,
                    done: 0,
                });
                next_id += 1;
                sent += 1;
            }
        }
        // The hook: in flight (running and set aside) vs not started.
        let in_flight: Vec<Option<&str>> = running.iter().chain(&aside).map(|q| q.name).collect();
        let wait: Vec<Option<&str>> = waiting.iter().map(|q| q.name).collect();
        let free = SLOTS - running.len() - aside.len();
        let decisions = s.admit_decisions(&in_flight, &wait, free);
        let mut still = VecDeque::new();
        for (q, d) in waiting.drain(..).zip(decisions) {
            match d {
                Decision::Admit => {
                    if q.name == Some("victim") {
                        assert!(unloaded_at.is_none(), "{q:?} admitted after the unload");
                        started_victims.insert(q.id);
                    }
                    running.push(q);
                }
                Decision::Wait => still.push_back(q),
                Decision::Refuse(m) => {
                    assert!(m.contains("victim"), "{q:?} refused: {m}");
                    refused.push(q);
                }
            }
        }
        waiting = still;
        // Set-aside sequences rejoin; then the bucketing runs the oldest sequence's position only.
        running.append(&mut aside);
        running.sort_by_key(|q| q.id);
        if let Some(key) = running.first().map(|q| q.done) {
            let (keep, out): (Vec<Seq>, Vec<Seq>) = running.drain(..).partition(|q| q.done == key);
            running = keep;
            aside = out;
        }
        // Every sequence in flight has its delta on the GPU and active (set aside ones included:
        // they come back next step).
        for q in running.iter().chain(&aside) {
            if let Some(n) = q.name {
                assert!(s.residency().device(n).is_some(), "{n} evicted under {q:?}");
                assert!(s.backend_active(n), "{n} not active under {q:?}");
            }
        }
        // The unload: once a victim sequence is set aside (the case the host used to get refused).
        if unloaded_at.is_none() && step >= 10 && aside.iter().any(|q| q.name == Some("victim")) {
            assert_eq!(s.unregister("victim").unwrap(), Unregistered::Draining);
            unloaded_at = Some(step);
        }
        if unloaded_at.is_some() && aside.iter().any(|q| q.name == Some("victim")) {
            victim_aside_while_draining += 1;
        }
        // The forward: one token for every sequence in the batch.
        for q in &mut running {
            q.left -= 1;
            q.done += 1;
        }
        finished.extend(running.iter().filter(|q| q.left == 0).map(|q| q.id));
        running.retain(|q| q.left > 0);
        if running.is_empty() && aside.is_empty() {
            let loading = waiting
                .iter()
                .filter_map(|q| q.name)
                .find(|n| s.residency().state(n) == DeltaState::Loading);
            if let Some(n) = loading {
                s.residency()
                    .wait_until(n, BOUND, |st| *st != DeltaState::Loading);
            }
        }
        step += 1;
    }
    assert!(
        unloaded_at.is_some(),
        "no victim sequence was ever set aside"
    );
    assert!(
        victim_aside_while_draining > 0,
        "vacuous: nothing drained set aside"
    );
    assert_eq!(finished.len() + refused.len(), sent);
    for id in &started_victims {
        assert!(
            finished.contains(id),
            "victim sequence {id} started before the unload, not finished"
        );
    }
    assert!(refused.iter().all(|q| !started_victims.contains(&q.id)));
    assert!(
        !refused.is_empty(),
        "vacuous: no victim sequence came after the unload"
    );
    // The last victim sequence finished: one more step drops the delta.
    s.admit(&[], &[None], SLOTS);
    assert!(!s.backend_active("victim"));
    assert_eq!(s.residency().state("victim"), DeltaState::Unregistered);
    eprintln!(
        "unloaded at step {unloaded_at:?}: {} victim sequences drained, {} refused, victim set aside \
         in {victim_aside_while_draining} steps while draining",
        started_victims.len(),
        refused.len()
    );
    assert_eq!(s.residency().backend().violations(), Vec::<String>::new());
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
