//! Admission with a fake lookup: slots, the delta cap, readiness and prefetch, base ride-along, and
//! fairness against strict arrival order on simulated engines.

mod common;

use std::cell::RefCell;
use std::collections::{HashMap, HashSet, VecDeque};

use common::Rng;
use dz_scheduler_ext::{Admission, Decision, DeltaLookup, Policy, Readiness};

/// Readiness by name (names absent are not deltas); records requests, peeks and pins.
#[derive(Default)]
struct Lookup {
    deltas: RefCell<HashMap<String, Readiness>>,
    requests: RefCell<Vec<String>>,
    peeks: RefCell<Vec<String>>,
    pins: RefCell<Vec<String>>,
}

impl Lookup {
    fn with(deltas: &[(&str, Readiness)]) -> Self {
        let l = Self::default();
        for (n, r) in deltas {
            l.set(n, r.clone());
        }
        l
    }

    fn set(&self, name: &str, r: Readiness) {
        self.deltas.borrow_mut().insert(name.to_owned(), r);
    }

    fn get(&self, name: &str) -> Readiness {
        self.deltas
            .borrow()
            .get(name)
            .cloned()
            .unwrap_or(Readiness::NotADelta)
    }
}

impl DeltaLookup for Lookup {
    fn is_delta(&self, name: &str) -> bool {
        self.deltas.borrow().contains_key(name)
    }
    fn request(&self, name: &str) {
        self.requests.borrow_mut().push(name.to_owned());
    }
    fn peek(&self, name: &str) -> Readiness {
        self.peeks.borrow_mut().push(name.to_owned());
        self.get(name)
    }
    fn pin(&self, name: &str) -> bool {
        self.pins.borrow_mut().push(name.to_owned());
        self.get(name) == Readiness::Ready
    }
}

const A: Decision = Decision::Admit;
const W: Decision = Decision::Wait;

#[test]
fn never_more_than_the_free_slots() {
    let l = Lookup::with(&[("a", Readiness::Ready)]);
    let mut adm = Admission::new(Policy::Fair, 8);
    let waiting = [Some("a"), None, Some("a"), None, Some("a")];
    assert_eq!(adm.decide(&[], &waiting, 2, &l), [A, A, W, W, W]);
    assert_eq!(adm.decide(&[], &waiting, 0, &l), [W, W, W, W, W]);
}

#[test]
fn the_delta_cap_counts_running_deltas_and_base_rides_along() {
    let l = Lookup::with(&[
        ("a", Readiness::Ready),
        ("b", Readiness::Ready),
        ("c", Readiness::Ready),
    ]);
    let mut adm = Admission::new(Policy::Fair, 2);
    // a and b already run: c would be a third delta. Base and a name that is not a delta (a merged
    // model) ride along; more of a joins its running delta.
    let running = [Some("a"), None, Some("b")];
    let waiting = [Some("c"), None, Some("a"), Some("merged"), Some("b")];
    let d = adm.decide(&running, &waiting, 10, &l);
    assert_eq!(d[0], W, "a third delta");
    assert_eq!((&d[1], &d[3]), (&A, &A), "base and not-a-delta ride along");
    // c is blocked by the cap: a and b are held back so one drains (head-of-line reservation).
    assert_eq!((&d[2], &d[4]), (&W, &W));

    // Cap 0: only sequences without a delta.
    let mut adm = Admission::new(Policy::Fair, 0);
    let d = adm.decide(&[], &[Some("a"), None, Some("merged")], 10, &l);
    assert_eq!(d, [W, A, A]);

    // Room under the cap: new deltas come in, each pinned once.
    let mut adm = Admission::new(Policy::Fair, 2);
    let l = Lookup::with(&[("a", Readiness::Ready), ("b", Readiness::Ready)]);
    let d = adm.decide(&[], &[Some("a"), Some("b"), Some("a"), Some("b")], 10, &l);
    assert_eq!(d, [A, A, A, A]);
    assert_eq!(*l.pins.borrow(), ["a", "b"]);
}

#[test]
fn a_delta_not_on_the_gpu_waits_and_its_load_is_requested() {
    let l = Lookup::with(&[("a", Readiness::Loading), ("b", Readiness::Ready)]);
    let mut adm = Admission::new(Policy::Fair, 8);
    let d = adm.decide(&[], &[Some("a"), Some("b"), Some("a")], 10, &l);
    assert_eq!(d, [W, A, W]);
    assert!(l.requests.borrow().contains(&"a".to_owned()));
    assert!(!l.pins.borrow().contains(&"a".to_owned()));
    // Once loaded, a's sequences are first in line (never served yet).
    l.set("a", Readiness::Ready);
    let d = adm.decide(&[Some("b")], &[Some("a"), Some("b"), Some("a")], 1, &l);
    assert_eq!(d, [A, W, W]);
}

#[test]
fn loads_are_requested_for_at_most_the_cap_per_step() {
    let l = Lookup::with(&[
        ("a", Readiness::Loading),
        ("b", Readiness::Loading),
        ("c", Readiness::Loading),
        ("d", Readiness::Ready),
        ("e", Readiness::Loading),
    ]);
    let mut adm = Admission::new(Policy::Fair, 2);
    let waiting = [Some("a"), Some("b"), Some("c"), Some("d"), Some("e")];
    let d = adm.decide(&[], &waiting, 10, &l);
    assert_eq!(d, [W, W, W, A, W]);
    // Loads for the two next in line (a, b), and d's request (a hit); c and e not asked for.
    assert_eq!(*l.requests.borrow(), ["a", "b", "d"]);
    assert_eq!(*l.peeks.borrow(), ["a", "b", "c", "d", "e"]);
}

#[test]
fn a_failed_or_unregistered_delta_is_refused_without_a_slot() {
    let l = Lookup::with(&[
        (
            "bad",
            Readiness::Refused("delta \"bad\" failed to load: x".into()),
        ),
        ("a", Readiness::Ready),
    ]);
    let mut adm = Admission::new(Policy::Fair, 8);
    let d = adm.decide(&[], &[Some("bad"), Some("a"), Some("bad")], 1, &l);
    let refuse = Decision::Refuse("delta \"bad\" failed to load: x".into());
    assert_eq!(d, [refuse.clone(), A, refuse]);
    assert_eq!(adm.stats().refused, 2);
    assert_eq!(adm.stats().admitted, 1);
}

#[test]
fn random_steps_keep_slots_cap_and_readiness() {
    let names = ["a", "b", "c", "d", "e", "f"];
    let states = [
        Readiness::Ready,
        Readiness::Ready,
        Readiness::Loading,
        Readiness::NoRoom,
        Readiness::Refused("gone".into()),
    ];
    let mut rng = Rng::new(42);
    let mut admitted_total = 0;
    for policy in [Policy::Fair, Policy::Fcfs] {
        for cap in 0..4 {
            let mut adm = Admission::new(policy, cap);
            for _ in 0..300 {
                let l = Lookup::default();
                for n in names {
                    l.set(n, states[rng.below(states.len())].clone());
                }
                let pick = |rng: &mut Rng| match rng.below(8) {
                    0 => None,
                    1 => Some("merged"),
                    k => Some(names[k - 2]),
                };
                // Running sequences use at most `cap` distinct ready deltas.
                let mut running = Vec::new();
                let mut run_deltas = HashSet::new();
                for _ in 0..rng.below(6) {
                    match pick(&mut rng) {
                        Some(n) if l.is_delta(n) => {
                            if (run_deltas.contains(n) || run_deltas.len() < cap)
                                && l.get(n) == Readiness::Ready
                            {
                                run_deltas.insert(n);
                                running.push(Some(n));
                            }
                        }
                        other => running.push(other),
                    }
                }
                let waiting: Vec<Option<&str>> =
                    (0..rng.below(12)).map(|_| pick(&mut rng)).collect();
                let free = rng.below(6);
                let d = adm.decide(&running, &waiting, free, &l);

                assert_eq!(d.len(), waiting.len());
                let admitted: Vec<Option<&str>> = waiting
                    .iter()
                    .zip(&d)
                    .filter(|(_, d)| **d == A)
                    .map(|(w, _)| *w)
                    .collect();
                admitted_total += admitted.len();
                assert!(admitted.len() <= free, "slots: {d:?}");
                let mut deltas = run_deltas.clone();
                for n in admitted.iter().flatten() {
                    if l.is_delta(n) {
                        assert_eq!(l.get(n), Readiness::Ready, "{n} admitted not ready");
                        deltas.insert(n);
                    }
                }
                assert!(deltas.len() <= cap, "cap {cap}: {deltas:?}");
                for (w, d) in waiting.iter().zip(&d) {
                    let r = w.map_or(Readiness::NotADelta, |n| l.get(n));
                    match &r {
                        Readiness::Refused(m) => assert_eq!(*d, Decision::Refuse(m.clone())),
                        _ => assert!(matches!(d, Decision::Admit | Decision::Wait)),
                    }
                    // Slots left over: nothing without a delta is left waiting.
                    if admitted.len() < free && r == Readiness::NotADelta {
                        assert_eq!(*d, A, "{w:?} left waiting with free slots");
                    }
                }
            }
        }
    }
    assert!(
        admitted_total > 500,
        "the workload admitted too little to show anything"
    );
}

/// A simulated engine: `max_seqs` slots, each sequence runs `seq_len` steps, arrivals per step.
struct Sim {
    max_seqs: usize,
    seq_len: usize,
    running: Vec<(Option<String>, usize)>,
    /// (fine-tune, arrival step, id)
    waiting: VecDeque<(Option<String>, usize, usize)>,
    next_id: usize,
    /// id -> (fine-tune, arrival step, admission step)
    done: HashMap<usize, (Option<String>, usize, usize)>,
}

impl Sim {
    fn new(max_seqs: usize, seq_len: usize) -> Self {
        Self {
            max_seqs,
            seq_len,
            running: Vec::new(),
            waiting: VecDeque::new(),
            next_id: 0,
            done: HashMap::new(),
        }
    }

    fn arrive(&mut self, name: Option<&str>, n: usize, step: usize) {
        for _ in 0..n {
            self.waiting
                .push_back((name.map(str::to_owned), step, self.next_id));
            self.next_id += 1;
        }
    }

    fn running_of(&self, name: &str) -> usize {
        self.running
            .iter()
            .filter(|(n, _)| n.as_deref() == Some(name))
            .count()
    }

    fn step(&mut self, adm: &mut Admission, lookup: &impl DeltaLookup, step: usize) {
        for r in &mut self.running {
            r.1 -= 1;
        }
        self.running.retain(|r| r.1 > 0);
        let free = self.max_seqs - self.running.len();
        let running: Vec<Option<&str>> = self.running.iter().map(|r| r.0.as_deref()).collect();
        let waiting: Vec<Option<&str>> = self.waiting.iter().map(|w| w.0.as_deref()).collect();
        let d = adm.decide(&running, &waiting, free, lookup);
        assert!(d.iter().filter(|d| **d == A).count() <= free);
        let mut still = VecDeque::new();
        for (w, d) in self.waiting.drain(..).zip(d) {
            if d == A {
                self.running.push((w.0.clone(), self.seq_len));
                self.done.insert(w.2, (w.0, w.1, step));
            } else {
                still.push_back(w);
            }
        }
        self.waiting = still;
    }

    /// Longest wait (admission step - arrival) of `name`'s sequences, and how many were admitted.
    fn max_wait(&self, name: &str) -> (usize, usize) {
        let waits: Vec<usize> = self
            .done
            .values()
            .filter(|(n, _, _)| n.as_deref() == Some(name))
            .map(|(_, a, s)| s - a)
            .collect();
        (
            waits.iter().copied().max().unwrap_or(usize::MAX),
            waits.len(),
        )
    }
}

/// 40 sequences of `a` at step 0, one each of `b` and `c` at step 2, 4 slots, 4 steps each.
fn flood_then_few(policy: Policy) -> Sim {
    let l = Lookup::with(&[
        ("a", Readiness::Ready),
        ("b", Readiness::Ready),
        ("c", Readiness::Ready),
    ]);
    let mut adm = Admission::new(policy, 8);
    let mut sim = Sim::new(4, 4);
    sim.arrive(Some("a"), 40, 0);
    for step in 0..200 {
        if step == 2 {
            sim.arrive(Some("b"), 1, step);
            sim.arrive(Some("c"), 1, step);
        }
        sim.step(&mut adm, &l, step);
    }
    assert!(sim.waiting.is_empty());
    sim
}

#[test]
fn fairness_a_flood_does_not_starve_later_fine_tunes_where_fcfs_does() {
    let fair = flood_then_few(Policy::Fair);
    let fcfs = flood_then_few(Policy::Fcfs);
    for n in ["b", "c"] {
        let (w_fair, k) = fair.max_wait(n);
        let (w_fcfs, _) = fcfs.max_wait(n);
        println!("{n}: waited {w_fair} steps (fair), {w_fcfs} (fcfs)");
        assert_eq!(k, 1);
        // Fair: in at the first free slots (the 4 running a's end at step 4).
        assert!(
            w_fair <= 2,
            "{n} waited {w_fair} steps under the fair policy"
        );
        // FCFS: behind the whole flood (40 sequences, 4 slots, 4 steps each).
        assert!(w_fcfs >= 30, "{n} waited only {w_fcfs} steps under FCFS");
    }
}

/// `a` floods forever (3 per step, more than the engine serves), `b`, `c`, `d` send one every 7
/// steps, base one every 5.
fn endless_flood(policy: Policy) -> Sim {
    let l = Lookup::with(&[
        ("a", Readiness::Ready),
        ("b", Readiness::Ready),
        ("c", Readiness::Ready),
        ("d", Readiness::Ready),
    ]);
    let mut adm = Admission::new(policy, 8);
    let mut sim = Sim::new(8, 4);
    for step in 0..150 {
        sim.arrive(Some("a"), 3, step);
        if step % 7 == 1 {
            for n in ["b", "c", "d"] {
                sim.arrive(Some(n), 1, step);
            }
        }
        if step % 5 == 0 {
            sim.arrive(None, 1, step);
        }
        sim.step(&mut adm, &l, step);
    }
    sim
}

#[test]
fn fairness_under_an_endless_flood_waits_stay_bounded() {
    let fair = endless_flood(Policy::Fair);
    let fcfs = endless_flood(Policy::Fcfs);
    for n in ["b", "c", "d"] {
        let (w_fair, k_fair) = fair.max_wait(n);
        let (w_fcfs, k_fcfs) = fcfs.max_wait(n);
        println!(
            "{n}: max wait {w_fair} (fair, {k_fair} served), {w_fcfs} (fcfs, {k_fcfs} served)"
        );
        assert!(k_fair >= 21, "{n}: only {k_fair} of 22 served");
        assert!(
            w_fair <= 4,
            "{n} waited {w_fair} steps under the fair policy"
        );
        assert!(w_fcfs >= 40, "{n}: FCFS waits should grow behind the flood");
    }
    // The flood still gets what the others leave.
    let (_, a_fair) = fair.max_wait("a");
    assert!(a_fair > 150, "a served {a_fair}");
}

/// Cap 2: `a` and `b` flood and keep their deltas running; `c` arrives at step 5.
fn cap_held_by_floods(policy: Policy, c_ready: impl Fn(&Sim) -> Readiness) -> Sim {
    let l = Lookup::with(&[("a", Readiness::Ready), ("b", Readiness::Ready)]);
    let mut adm = Admission::new(policy, 2);
    let mut sim = Sim::new(8, 3);
    for step in 0..80 {
        sim.arrive(Some("a"), 2, step);
        sim.arrive(Some("b"), 2, step);
        if step == 5 {
            sim.arrive(Some("c"), 1, step);
        }
        l.set("c", c_ready(&sim));
        sim.step(&mut adm, &l, step);
    }
    sim
}

#[test]
fn fairness_a_delta_blocked_by_the_cap_gets_in_once_a_running_delta_drains() {
    let fair = cap_held_by_floods(Policy::Fair, |_| Readiness::Ready);
    let fcfs = cap_held_by_floods(Policy::Fcfs, |_| Readiness::Ready);
    let (w, k) = fair.max_wait("c");
    println!(
        "c: waited {w} steps (fair); fcfs served {}",
        fcfs.max_wait("c").1
    );
    assert_eq!(k, 1);
    // One step to reach the front, then a and b drain (3 steps per sequence).
    assert!(w <= 5, "c waited {w} steps");
    assert_eq!(
        fcfs.max_wait("c").1,
        0,
        "FCFS keeps a and b running forever"
    );
}

#[test]
fn fairness_a_load_waiting_for_gpu_room_gets_in_once_a_running_delta_drains() {
    // The GPU holds two deltas: c's load waits for room while a and b both run.
    let c_ready = |sim: &Sim| {
        if sim.running_of("a") > 0 && sim.running_of("b") > 0 {
            Readiness::NoRoom
        } else {
            Readiness::Ready
        }
    };
    let fair = cap_held_by_floods(Policy::Fair, c_ready);
    let fcfs = cap_held_by_floods(Policy::Fcfs, c_ready);
    let (w, k) = fair.max_wait("c");
    assert_eq!(k, 1);
    assert!(w <= 5, "c waited {w} steps");
    assert_eq!(fcfs.max_wait("c").1, 0);
}

#[test]
fn one_fine_tune_alone_is_served_in_arrival_order_by_both_policies() {
    let l = Lookup::with(&[("a", Readiness::Ready)]);
    for policy in [Policy::Fair, Policy::Fcfs] {
        let mut adm = Admission::new(policy, 1);
        let d = adm.decide(&[Some("a")], &[Some("a"); 5], 3, &l);
        assert_eq!(d, [A, A, A, W, W], "{policy:?}");
    }
}
