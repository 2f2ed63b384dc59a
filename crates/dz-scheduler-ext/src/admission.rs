//! Which waiting sequences start this step.
//!
//! # The fair policy ([`Policy::Fair`], the default)
//! Waiting sequences are grouped by what they ask for: one group per fine-tune, one for the base
//! (`None`), one per name that is not a delta (treated as the base: no delta, always ready). Each
//! group keeps arrival order. Groups are ordered **least recently served first** (the step in which
//! the group last had a sequence admitted; never served = first; ties by the arrival of the group's
//! oldest sequence), and admission goes round robin over that order, one sequence per group per
//! round, until the free slots are used or a round admits nothing. A group that got a sequence in
//! has the newest stamp and goes to the back next step, so a flood of one fine-tune takes at most
//! one slot per round while every other waiting group gets one: with at least one free slot per
//! step, a ready group with `G` groups ahead of it is served within `G + 1` steps, whatever the
//! flood behind or before it. A group with nothing waiting is forgotten (it had no backlog; when
//! it comes back it starts at the front). Strict arrival order ([`Policy::Fcfs`], kept as the
//! comparison) serves the whole flood first.
//!
//! # Deltas, the cap and readiness
//! - A sequence of a fine-tune is admitted only when its delta is on the GPU
//!   ([`Readiness::Ready`]) and then pinned ([`DeltaLookup::pin`]); otherwise it waits and its load
//!   is requested (prefetch). Decisions are made on [`DeltaLookup::peek`]s and the requests go out
//!   after the admitted deltas are pinned, so a load started by this step cannot evict a delta the
//!   step admits. Loads are requested for at most `max_deltas_per_step` not-ready deltas per step,
//!   in policy order (the ones next in line), so a long queue does not make the GPU tier thrash.
//! - At most `max_deltas_per_step` distinct deltas in a step, running ones included: a new delta is
//!   admitted only while the running and admitted deltas number fewer.
//! - **Head-of-line reservation**: when a ready delta is blocked by the cap, or a delta's load waits
//!   for GPU room held by running deltas ([`Readiness::NoRoom`]), no further sequence with a delta
//!   is admitted for the rest of the step. The blocked group stays at the front of the order (it was
//!   not served), so from the next step on the running deltas drain until a cap position or GPU room
//!   frees, instead of floods keeping their deltas running forever. Base sequences still ride along.
//! - Base sequences and names that are not deltas cost no delta and need no readiness: they take
//!   slots only (and their group's turn, so the base cannot starve fine-tunes either).
//! - A fine-tune whose delta failed to load or was unregistered is refused
//!   ([`Decision::Refuse`] with the reason), so the host can end those sequences with an error
//!   instead of running them on the base. Only sequences that have not started are asked about:
//!   those in flight are `running` and keep their delta (an unregistered one drains for them).

use std::collections::{HashMap, HashSet};

/// What [`DeltaLookup`] says about a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    /// On the GPU: sequences for it can run.
    Ready,
    /// Loading (or about to): wait.
    Loading,
    /// Waiting for GPU room that running deltas hold: wait, and let running deltas drain.
    NoRoom,
    /// Its sequences cannot run (failed load, unregistered): refuse with this reason.
    Refused(String),
    /// Not a delta (the base, or a model served otherwise): runs without a delta.
    NotADelta,
}

/// The residency as admission sees it (implemented by [`crate::Residency`]; fakes in tests).
pub trait DeltaLookup {
    /// Whether `name` is a delta (so a running sequence of it holds a place under the cap).
    fn is_delta(&self, name: &str) -> bool;
    /// Asks for `name` on the GPU: starts its load when it is not there (and counts the request).
    /// Called after the step's admissions are pinned.
    fn request(&self, name: &str);
    /// Where `name` stands, without side effects. A failed delta that a request would retry is
    /// [`Readiness::Loading`], not refused.
    fn peek(&self, name: &str) -> Readiness;
    /// Pins `name` for the step if it is still ready; false when it no longer is (do not admit).
    /// Called once per delta new to the step; the running sequences' deltas are the caller's to pin
    /// ([`crate::Residency::set_running`] before [`Admission::decide`]).
    fn pin(&self, name: &str) -> bool;
}

/// The order waiting sequences are considered in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Policy {
    /// Least recently served fine-tune first, round robin within a step (module docs).
    #[default]
    Fair,
    /// Strict arrival order (skipping sequences that cannot run): starves the few behind a flood.
    /// For comparison and for single-tenant use.
    Fcfs,
}

/// The decision for one waiting sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Starts this step.
    Admit,
    /// Stays waiting (no slot, the delta cap, or its delta is not on the GPU yet).
    Wait,
    /// Cannot run: its delta failed to load or was unregistered (the reason).
    Refuse(String),
}

/// Counters of an [`Admission`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AdmissionStats {
    /// Steps decided.
    pub steps: u64,
    /// Sequences admitted.
    pub admitted: u64,
    /// Sequences refused.
    pub refused: u64,
    /// Sequences left waiting, summed over steps.
    pub deferred: u64,
}

/// The admission policy and its state across steps (when each group was last served).
#[derive(Debug, Clone)]
pub struct Admission {
    policy: Policy,
    max_deltas_per_step: usize,
    step: u64,
    /// Step in which each waiting group last had a sequence admitted (`None` key: the base).
    last_served: HashMap<Option<String>, u64>,
    stats: AdmissionStats,
}

struct Group<'a> {
    /// `None`: the base.
    key: Option<&'a str>,
    members: Vec<usize>,
    next: usize,
    readiness: Readiness,
    blocked: bool,
    served: bool,
}

impl Admission {
    /// A policy with a cap on distinct deltas per step (0: only sequences without a delta run).
    pub fn new(policy: Policy, max_deltas_per_step: usize) -> Self {
        Self {
            policy,
            max_deltas_per_step,
            step: 0,
            last_served: HashMap::new(),
            stats: AdmissionStats::default(),
        }
    }

    /// The counters so far.
    pub fn stats(&self) -> AdmissionStats {
        self.stats
    }

    /// Decides this step: one [`Decision`] per `waiting` sequence (in arrival order; each names its
    /// fine-tune, `None` for the base), given the fine-tunes of the `running` sequences and the free
    /// batch slots. Never admits more than `free_slots`, nor more than `max_deltas_per_step`
    /// distinct deltas together with the running ones. `running` is every sequence in flight (in
    /// the batch, or moved back to waiting by the host) and `waiting` only sequences that have not
    /// started ([`crate::Scheduler::admit`] says why).
    pub fn decide(
        &mut self,
        running: &[Option<&str>],
        waiting: &[Option<&str>],
        free_slots: usize,
        lookup: &impl DeltaLookup,
    ) -> Vec<Decision> {
        self.step += 1;
        let cap = self.max_deltas_per_step;

        // Groups by what they ask for, in order of their oldest sequence.
        let mut groups: Vec<Group<'_>> = Vec::new();
        let mut index: HashMap<Option<&str>, usize> = HashMap::new();
        for (i, w) in waiting.iter().enumerate() {
            let g = *index.entry(*w).or_insert_with(|| {
                groups.push(Group {
                    key: *w,
                    members: Vec::new(),
                    next: 0,
                    readiness: Readiness::NotADelta,
                    blocked: false,
                    served: false,
                });
                groups.len() - 1
            });
            groups[g].members.push(i);
        }
        let mut order: Vec<usize> = (0..groups.len()).collect();
        if self.policy == Policy::Fair {
            let stamp = |g: &Group<'_>| {
                self.last_served
                    .get(&g.key.map(str::to_owned))
                    .copied()
                    .unwrap_or(0)
            };
            order.sort_by_key(|&g| (stamp(&groups[g]), groups[g].members[0]));
        }

        // Readiness, once per group, looked at without side effects: loads start only after the
        // admitted deltas are pinned (below), so a load started now cannot evict a delta this step
        // is about to admit.
        for &g in &order {
            if let Some(name) = groups[g].key {
                groups[g].readiness = lookup.peek(name);
            }
        }

        let mut decisions = vec![Decision::Wait; waiting.len()];
        for g in &mut groups {
            if let Readiness::Refused(reason) = &g.readiness {
                for &m in &g.members {
                    decisions[m] = Decision::Refuse(reason.clone());
                }
                g.blocked = true;
            }
        }
        let mut active: HashSet<&str> = running
            .iter()
            .flatten()
            .copied()
            .filter(|n| lookup.is_delta(n))
            .collect();
        let mut slots = free_slots;
        let mut reserve = false;
        match self.policy {
            Policy::Fair => 'rounds: loop {
                let mut progressed = false;
                for &g in &order {
                    if slots == 0 {
                        break 'rounds;
                    }
                    let group = &mut groups[g];
                    if group.blocked || group.next == group.members.len() {
                        continue;
                    }
                    if admissible(group, &mut active, &mut reserve, cap, lookup) {
                        decisions[group.members[group.next]] = Decision::Admit;
                        group.next += 1;
                        group.served = true;
                        slots -= 1;
                        progressed = true;
                    } else {
                        group.blocked = true;
                    }
                }
                if !progressed {
                    break;
                }
            },
            Policy::Fcfs => {
                let mut group_of = vec![0; waiting.len()];
                for (gi, g) in groups.iter().enumerate() {
                    for &m in &g.members {
                        group_of[m] = gi;
                    }
                }
                for (i, &gi) in group_of.iter().enumerate() {
                    if slots == 0 {
                        break;
                    }
                    let group = &mut groups[gi];
                    if group.blocked {
                        continue;
                    }
                    let mut no_reserve = false;
                    if admissible(group, &mut active, &mut no_reserve, cap, lookup) {
                        decisions[i] = Decision::Admit;
                        group.served = true;
                        slots -= 1;
                    }
                }
            }
        }

        // Requests, in policy order: ready deltas (hit counters, LRU), and loads for the first
        // `cap` deltas not on the GPU.
        let mut requested_pending = 0;
        for &g in &order {
            let Some(name) = groups[g].key else { continue };
            match groups[g].readiness {
                Readiness::Ready => lookup.request(name),
                Readiness::Loading | Readiness::NoRoom if requested_pending < cap => {
                    requested_pending += 1;
                    lookup.request(name);
                }
                _ => {}
            }
        }

        // Stamps: served groups move to the back; groups no longer waiting are forgotten.
        let waiting_keys: HashSet<Option<&str>> = groups.iter().map(|g| g.key).collect();
        self.last_served
            .retain(|k, _| waiting_keys.contains(&k.as_deref()));
        for g in groups.iter().filter(|g| g.served) {
            self.last_served.insert(g.key.map(str::to_owned), self.step);
        }

        self.stats.steps += 1;
        for d in &decisions {
            match d {
                Decision::Admit => self.stats.admitted += 1,
                Decision::Wait => self.stats.deferred += 1,
                Decision::Refuse(_) => self.stats.refused += 1,
            }
        }
        decisions
    }
}

/// Whether the group's next sequence can start now (pinning its delta when it is new to the step).
/// Sets `reserve` when a ready delta is blocked by the cap or a load waits for GPU room; under
/// `reserve` no sequence with a delta is admitted.
fn admissible<'a>(
    group: &Group<'a>,
    active: &mut HashSet<&'a str>,
    reserve: &mut bool,
    cap: usize,
    lookup: &impl DeltaLookup,
) -> bool {
    let Some(name) = group.key else { return true };
    match group.readiness {
        Readiness::NotADelta => true,
        Readiness::Loading | Readiness::Refused(_) => false,
        Readiness::NoRoom => {
            *reserve = true;
            false
        }
        Readiness::Ready if *reserve => false,
        Readiness::Ready if active.contains(name) => true,
        Readiness::Ready if active.len() < cap => {
            if lookup.pin(name) {
                active.insert(name);
                true
            } else {
                false
            }
        }
        Readiness::Ready => {
            *reserve = true;
            false
        }
    }
}
