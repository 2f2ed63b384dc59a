//! Residency tiers with a fake backend: background loads, eviction and reload, pinning, queueing,
//! failures, hot register/unregister, concurrency, metrics.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Fake, Rng, BOUND};
use dz_scheduler_ext::{DeltaState, Error, Residency, ResidencyOptions, Unregistered};

fn residency(fake: Fake, gpu_bytes: u64, cpu_bytes: u64, load_threads: usize) -> Residency<Fake> {
    Residency::new(
        fake,
        ResidencyOptions {
            gpu_bytes,
            cpu_bytes,
            load_threads,
            retry_after: Duration::from_secs(3600),
            // These tests load deltas without admitting sequences for them and check the LRU order.
            fresh_grace: Duration::ZERO,
        },
    )
    .unwrap()
}

/// Requests `name` and waits for its load to settle; panics unless it ends `Ready`.
fn load(r: &Residency<Fake>, name: &str) {
    r.request(name);
    assert_eq!(r.wait(name, BOUND), DeltaState::Ready, "{name}");
}

fn assert_clean(r: &Residency<Fake>) {
    assert_eq!(r.backend().violations(), Vec::<String>::new());
}

#[test]
fn a_miss_loads_in_the_background_and_request_never_blocks() {
    let r = residency(Fake::gated(1000), 1000, 1000, 1);
    r.register("a", 100).unwrap();
    assert_eq!(r.state("a"), DeltaState::Idle);
    assert_eq!(r.request("a"), DeltaState::Loading);
    // The load is parked in the backend's upload; requests still answer at once.
    assert!(r.backend().wait_at_gate("a", 1));
    assert_eq!(r.request("a"), DeltaState::Loading);
    assert_eq!(r.state("a"), DeltaState::Loading);
    assert!(r.device("a").is_none());
    assert!(!r.backend().is_active("a"));
    assert_eq!(r.backend().reads("a"), 1, "one load, however many requests");

    r.backend().release("a");
    assert_eq!(r.wait("a", BOUND), DeltaState::Ready);
    assert!(r.backend().is_active("a"));
    assert_eq!(r.device("a").unwrap().bytes, 100);
    assert_eq!(r.request("a"), DeltaState::Ready);

    let m = r.metrics();
    assert_eq!((m.gpu.hits, m.gpu.misses, m.gpu.loads), (1, 2, 1));
    assert_eq!((m.cpu.hits, m.cpu.misses, m.cpu.loads), (0, 1, 1));
    assert_eq!((m.gpu.bytes_used, m.cpu.bytes_used), (100, 100));
    assert_eq!(r.backend().uploads("a"), 1);
    assert_clean(&r);
}

#[test]
fn wait_for_change_wakes_when_a_load_finishes_and_times_out_otherwise() {
    let r = residency(Fake::gated(1000), 1000, 1000, 1);
    r.register("a", 100).unwrap();
    // Nothing happens: the wait ends at its timeout.
    let t = std::time::Instant::now();
    r.wait_for_change(Duration::from_millis(30));
    assert!(
        t.elapsed() >= Duration::from_millis(25),
        "{:?}",
        t.elapsed()
    );
    // A load parked in the backend; released from another thread, the wait ends long before its
    // timeout (a host loop with nothing to run blocks here instead of spinning on `request`).
    assert_eq!(r.request("a"), DeltaState::Loading);
    assert!(r.backend().wait_at_gate("a", 1));
    let t = std::time::Instant::now();
    std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(Duration::from_millis(20));
            r.backend().release("a");
        });
        while r.state("a") != DeltaState::Ready && t.elapsed() < BOUND {
            r.wait_for_change(BOUND);
        }
    });
    assert_eq!(r.state("a"), DeltaState::Ready);
    assert!(t.elapsed() < BOUND / 2, "{:?}", t.elapsed());
    assert_clean(&r);
}

#[test]
fn several_loads_are_in_flight_at_once() {
    let r = residency(Fake::gated(1000), 1000, 1000, 3);
    for n in ["a", "b", "c"] {
        r.register(n, 100).unwrap();
        assert_eq!(r.request(n), DeltaState::Loading);
    }
    for n in ["a", "b", "c"] {
        assert!(r.backend().wait_at_gate(n, 1), "{n} not in flight");
    }
    assert_eq!(r.metrics().loads_in_flight, 3);
    // GPU bytes are reserved before the uploads: 300 in flight count as used.
    assert_eq!(r.metrics().gpu.bytes_used, 300);
    r.backend().open();
    for n in ["a", "b", "c"] {
        assert_eq!(r.wait(n, BOUND), DeltaState::Ready);
    }
    assert_clean(&r);
}

#[test]
fn budgets_smaller_than_the_set_evict_and_reload_with_nothing_lost() {
    // GPU fits 2 of the 5 deltas, the CPU cache 3.
    let sizes = [("a", 100), ("b", 90), ("c", 100), ("d", 80), ("e", 100)];
    let r = residency(Fake::new(200), 200, 300, 2);
    for (n, s) in sizes {
        r.register(n, s).unwrap();
    }
    let mut rng = Rng::new(7);
    let mut requests = 0;
    for round in 0..60 {
        // Mostly a, b, c (CPU-cache hits on reload), sometimes d and e (CPU evictions).
        let (name, bytes) = if round % 5 == 4 {
            sizes[3 + rng.below(2)]
        } else {
            sizes[rng.below(3)]
        };
        load(&r, name);
        requests += 1;
        let dev = r.device(name).unwrap();
        assert_eq!(
            (dev.name.as_str(), dev.bytes),
            (name, bytes),
            "the right delta, whole"
        );
        let m = r.metrics();
        assert!(m.gpu.bytes_used <= 200 && m.cpu.bytes_used <= 300, "{m:?}");
    }
    let m = r.metrics();
    assert!(m.gpu.evictions > 0 && m.cpu.evictions > 0, "{m:?}");
    assert!(m.cpu.hits > 0, "reloads come from the CPU cache: {m:?}");
    assert_eq!(
        m.gpu.loads,
        m.cpu.hits + m.cpu.loads,
        "every upload read once"
    );
    assert_eq!(m.gpu.hits + m.gpu.misses, requests, "one count per request");
    // Every delta still loads after all that.
    for (n, s) in sizes {
        load(&r, n);
        assert_eq!(r.device(n).unwrap().bytes, s);
    }
    assert_clean(&r);
}

#[test]
fn pinned_deltas_are_never_evicted() {
    let r = residency(Fake::new(200), 200, 1000, 1);
    for n in ["a", "b", "c"] {
        r.register(n, 100).unwrap();
    }
    load(&r, "a");
    load(&r, "b");
    // a is older (least recently used) but pinned: c evicts b.
    r.set_running(["a"]);
    load(&r, "c");
    assert_eq!(r.state("a"), DeltaState::Ready);
    assert_eq!(r.state("b"), DeltaState::Idle);
    assert!(r.backend().is_active("a") && !r.backend().is_active("b"));
    assert!(!r.backend().log().contains(&"deactivate a".to_owned()));
    // pin() adds to the step's pinned set: now b can only evict... nothing.
    assert!(r.pin("c"));
    r.request("b");
    assert_eq!(r.wait("b", BOUND), DeltaState::Queued);
    assert_eq!(r.state("a"), DeltaState::Ready);
    assert_eq!(r.state("c"), DeltaState::Ready);
    assert_clean(&r);
}

#[test]
fn a_load_waits_queued_while_the_gpu_is_full_of_pinned_deltas() {
    let r = residency(Fake::new(200), 200, 1000, 2);
    for n in ["a", "b", "c"] {
        r.register(n, 100).unwrap();
    }
    load(&r, "a");
    load(&r, "b");
    r.set_running(["a", "b"]);
    assert_eq!(r.request("c"), DeltaState::Loading);
    assert_eq!(r.wait("c", BOUND), DeltaState::Queued);
    assert_eq!(r.request("c"), DeltaState::Queued, "queued, not failed");
    // The same pinned set again frees nothing.
    r.set_running(["b", "a"]);
    assert_eq!(r.state("c"), DeltaState::Queued);
    // a finishes: c loads in a's place.
    r.set_running(["b"]);
    assert_eq!(
        r.wait_until("c", BOUND, |s| *s == DeltaState::Ready),
        DeltaState::Ready
    );
    assert_eq!(r.state("a"), DeltaState::Idle);
    assert_eq!(r.state("b"), DeltaState::Ready);
    assert_eq!(
        r.backend().reads("c"),
        1,
        "the queued load kept its host form"
    );
    assert_clean(&r);
}

#[test]
fn a_delta_bigger_than_the_gpu_budget_fails_clearly() {
    let r = residency(Fake::new(100), 100, 1000, 1);
    r.register("huge", 150).unwrap();
    r.request("huge");
    match r.wait("huge", BOUND) {
        DeltaState::Failed(m) => assert!(
            m.contains("150") && m.contains("whole GPU budget of 100"),
            "{m}"
        ),
        s => panic!("{s:?}"),
    }
    assert_eq!(r.metrics().load_failures, 1);
    assert_eq!(r.metrics().gpu.bytes_used, 0);
}

#[test]
fn a_failed_load_is_reported_and_a_later_request_retries() {
    let fake = Fake::new(1000);
    fake.state()
        .fail_read
        .insert("a".into(), "disk on fire".into());
    let r = Residency::new(
        fake,
        ResidencyOptions {
            gpu_bytes: 1000,
            cpu_bytes: 1000,
            load_threads: 1,
            retry_after: Duration::ZERO,
            fresh_grace: Duration::ZERO,
        },
    )
    .unwrap();
    r.register("a", 100).unwrap();
    r.request("a");
    assert_eq!(
        r.wait("a", BOUND),
        DeltaState::Failed("read: disk on fire".into())
    );
    assert_eq!(r.metrics().load_failures, 1);
    assert!(r
        .to_prometheus()
        .contains("deltazip_delta_state{delta=\"a\",state=\"failed\"} 1"));

    r.backend().state().fail_read.clear();
    assert_eq!(r.request("a"), DeltaState::Loading, "retried");
    assert_eq!(r.wait("a", BOUND), DeltaState::Ready);
    assert_eq!(r.backend().reads("a"), 2);
    assert_clean(&r);
}

#[test]
fn a_failure_is_not_retried_before_retry_after() {
    let fake = Fake::new(1000);
    fake.state().fail_read.insert("a".into(), "bad".into());
    let r = residency(fake, 1000, 1000, 1);
    r.register("a", 100).unwrap();
    r.request("a");
    assert!(matches!(r.wait("a", BOUND), DeltaState::Failed(_)));
    assert_eq!(r.request("a"), DeltaState::Failed("read: bad".into()));
    assert_eq!(r.backend().reads("a"), 1, "no re-read every step");
}

#[test]
fn a_panicking_backend_fails_the_load_and_the_thread_survives() {
    let fake = Fake::new(1000);
    fake.state().panic_read.push("a".into());
    let r = residency(fake, 1000, 1000, 1);
    r.register("a", 100).unwrap();
    r.register("b", 100).unwrap();
    r.request("a");
    match r.wait("a", BOUND) {
        DeltaState::Failed(m) => assert!(m.contains("panicked"), "{m}"),
        s => panic!("{s:?}"),
    }
    load(&r, "b");
}

#[test]
fn register_and_unregister_while_in_use() {
    let r = residency(Fake::new(1000), 1000, 1000, 1);
    assert!(matches!(r.register("", 1), Err(Error::EmptyName)));
    r.register("a", 100).unwrap();
    assert!(matches!(
        r.register("a", 100),
        Err(Error::AlreadyRegistered { name }) if name == "a"
    ));
    assert!(matches!(
        r.unregister("zz"),
        Err(Error::UnknownDelta { name }) if name == "zz"
    ));
    assert_eq!(r.request("zz"), DeltaState::Unknown);

    // In use: draining, still active for the running sequences, admits nothing new.
    load(&r, "a");
    r.set_running(["a"]);
    assert_eq!(r.unregister("a").unwrap(), Unregistered::Draining);
    assert_eq!(r.request("a"), DeltaState::Draining);
    assert_eq!(r.state("a"), DeltaState::Draining);
    assert!(!r.pin("a"));
    assert!(r.backend().is_active("a"));
    assert!(r
        .to_prometheus()
        .contains("deltazip_delta_state{delta=\"a\",state=\"draining\"} 1"));
    assert!(matches!(
        r.register("a", 100),
        Err(Error::StillDraining { .. })
    ));
    assert!(matches!(r.unregister("a"), Err(Error::UnknownDelta { .. })));
    r.set_running(["a"]);
    assert!(r.backend().is_active("a"), "still running");
    r.set_running([]);
    assert!(!r.backend().is_active("a"), "dropped once unused");
    assert_eq!(r.state("a"), DeltaState::Unregistered);
    assert_eq!(r.metrics().gpu.bytes_used, 0);

    // Not in use: dropped at once; the name can come back.
    r.register("a", 120).unwrap();
    load(&r, "a");
    assert_eq!(r.device("a").unwrap().bytes, 120);
    assert_eq!(r.unregister("a").unwrap(), Unregistered::Dropped);
    assert!(!r.backend().is_active("a"));
    assert_eq!(r.metrics().cpu.bytes_used, 0);
    assert_clean(&r);
}

#[test]
fn unregister_during_a_load_discards_it() {
    let r = residency(Fake::gated(1000), 1000, 1000, 1);
    r.register("a", 100).unwrap();
    r.request("a");
    assert!(r.backend().wait_at_gate("a", 1));
    assert_eq!(r.unregister("a").unwrap(), Unregistered::Dropped);
    // Registered again while the old load is still in the backend.
    r.register("a", 100).unwrap();
    assert_eq!(r.request("a"), DeltaState::Loading);
    r.backend().open();
    assert_eq!(r.wait("a", BOUND), DeltaState::Ready);
    // One load thread: the first load finished (and was discarded) before the second ran.
    assert_eq!(r.backend().uploads("a"), 2);
    assert_eq!(
        r.metrics().gpu.bytes_used,
        100,
        "the discarded copy is not counted"
    );
    assert_eq!(
        r.backend().log(),
        vec!["activate a".to_owned()],
        "the stale load never activated"
    );
    assert_clean(&r);
}

#[test]
fn concurrent_requests_from_several_threads_load_each_delta_once() {
    let r = Arc::new(residency(Fake::new(10_000), 10_000, 10_000, 2));
    let names: Vec<String> = (0..6).map(|i| format!("d{i}")).collect();
    for n in &names {
        r.register(n, 100).unwrap();
    }
    std::thread::scope(|s| {
        for t in 0..8 {
            let (r, names) = (&r, &names);
            s.spawn(move || {
                for k in 0..names.len() {
                    let n = &names[(t + k) % names.len()];
                    r.request(n);
                    assert_eq!(r.wait(n, BOUND), DeltaState::Ready);
                    assert_eq!(r.request(n), DeltaState::Ready);
                }
            });
        }
    });
    for n in &names {
        assert_eq!(
            (r.backend().reads(n), r.backend().uploads(n)),
            (1, 1),
            "{n}"
        );
    }
    assert_clean(&r);
}

#[test]
fn concurrent_traffic_under_small_budgets_keeps_every_invariant() {
    // 8 deltas, GPU room for 3, CPU for 4; request threads, a "scheduler" thread pinning what it
    // got, and a thread registering and unregistering a ninth delta.
    let r = Arc::new(residency(Fake::new(300), 300, 400, 2));
    for i in 0..8 {
        r.register(&format!("d{i}"), 100).unwrap();
    }
    std::thread::scope(|s| {
        for t in 0..4 {
            let r = &r;
            s.spawn(move || {
                let mut rng = Rng::new(t);
                for _ in 0..200 {
                    r.request(&format!("d{}", rng.below(8)));
                }
            });
        }
        let r2 = &r;
        s.spawn(move || {
            let mut rng = Rng::new(99);
            for _ in 0..200 {
                let n = format!("d{}", rng.below(8));
                if r2.pin(&n) {
                    assert!(r2.device(&n).is_some(), "pinned means on the GPU");
                }
                let m = r2.metrics();
                assert!(m.gpu.bytes_used <= 300 && m.cpu.bytes_used <= 400);
                r2.set_running([]);
            }
        });
        let r3 = &r;
        s.spawn(move || {
            for _ in 0..50 {
                r3.register("hot", 100).unwrap();
                r3.request("hot");
                r3.unregister("hot").unwrap();
            }
        });
    });
    // Settle: the loads the traffic queued finish first. With `fresh_grace` 0 each of them may evict a
    // delta loaded a moment before, so a delta requested while they run can be Ready and evicted again
    // before its waiter looks (a CI run saw d0 end Idle that way). Then every delta can still be loaded,
    // one at a time.
    let deadline = std::time::Instant::now() + BOUND;
    while (r.metrics().deltas.iter())
        .any(|d| matches!(d.state, DeltaState::Loading | DeltaState::Queued))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the queued loads did not finish"
        );
        r.wait_for_change(Duration::from_millis(50));
    }
    for i in 0..8 {
        let n = format!("d{i}");
        r.request(&n);
        let s = r.wait_until(&n, BOUND, |s| *s == DeltaState::Ready);
        assert_eq!(s, DeltaState::Ready, "{n}");
    }
    assert!(!r.backend().is_active("hot"));
    assert_clean(&r);
}

#[test]
fn prometheus_text_names_tiers_and_deltas() {
    let r = residency(Fake::new(1000), 1000, 1000, 1);
    r.register("a\"b", 100).unwrap();
    load(&r, "a\"b");
    r.request("a\"b");
    let text = r.to_prometheus();
    for line in [
        "deltazip_delta_hits_total{tier=\"gpu\"} 1",
        "deltazip_delta_misses_total{tier=\"gpu\"} 1",
        "deltazip_delta_misses_total{tier=\"cpu\"} 1",
        "deltazip_delta_loads_total{tier=\"gpu\"} 1",
        "deltazip_delta_bytes_used{tier=\"gpu\"} 100",
        "deltazip_delta_bytes_budget{tier=\"cpu\"} 1000",
        "deltazip_delta_evictions_total{tier=\"gpu\"} 0",
        "deltazip_delta_state{delta=\"a\\\"b\",state=\"ready\"} 1",
        "deltazip_delta_resident_bytes{delta=\"a\\\"b\",tier=\"gpu\"} 100",
        "# TYPE deltazip_delta_hits_total counter",
    ] {
        assert!(text.lines().any(|l| l == line), "{line:?} not in\n{text}");
    }
    assert!(text.contains("deltazip_delta_load_seconds_total{tier=\"gpu\"} "));
}

#[test]
fn zero_load_threads_is_refused() {
    let e = Residency::new(
        Fake::new(1),
        ResidencyOptions {
            load_threads: 0,
            ..ResidencyOptions::default()
        },
    )
    .unwrap_err();
    assert!(matches!(e, Error::NoLoadThreads));
}

/// A residency whose loads keep their delta from eviction for `grace` until it is admitted.
fn residency_with_grace(fake: Fake, gpu_bytes: u64, grace: Duration) -> Residency<Fake> {
    Residency::new(
        fake,
        ResidencyOptions {
            gpu_bytes,
            cpu_bytes: 10_000,
            load_threads: 1,
            retry_after: Duration::from_secs(3600),
            fresh_grace: grace,
        },
    )
    .unwrap()
}

#[test]
fn a_fresh_delta_is_not_evicted_before_its_sequences_start() {
    // Room for two. a and b are loaded for waiting requests and not admitted yet: c's load waits
    // instead of evicting one of them (session 12's 64 fine-tunes on room for 34: each load evicted
    // the one before it).
    let r = residency_with_grace(Fake::new(200), 200, Duration::from_secs(3600));
    for n in ["a", "b", "c"] {
        r.register(n, 100).unwrap();
    }
    load(&r, "a");
    load(&r, "b");
    r.request("c");
    assert_eq!(r.wait("c", Duration::from_millis(100)), DeltaState::Queued);
    assert_eq!(r.state("a"), DeltaState::Ready);
    assert_eq!(r.state("b"), DeltaState::Ready);
    // a's sequence starts (pinned), then ends: a is an ordinary LRU delta again and makes room.
    assert!(r.pin("a"));
    r.set_running([]);
    assert_eq!(r.wait("c", BOUND), DeltaState::Ready);
    assert_eq!(
        r.state("a"),
        DeltaState::Idle,
        "a, used and unpinned, was the one evicted"
    );
    assert_eq!(r.state("b"), DeltaState::Ready, "b is still fresh");
    assert_clean(&r);
}

#[test]
fn a_fresh_delta_becomes_evictable_when_its_grace_runs_out() {
    let r = residency_with_grace(Fake::new(200), 200, Duration::from_millis(50));
    for n in ["a", "b", "c"] {
        r.register(n, 100).unwrap();
    }
    load(&r, "a");
    load(&r, "b");
    r.request("c");
    assert_eq!(r.wait("c", Duration::from_millis(10)), DeltaState::Queued);
    std::thread::sleep(Duration::from_millis(60));
    // The next scheduling step sees the grace gone and retries the queued load.
    r.set_running([]);
    assert_eq!(r.wait("c", BOUND), DeltaState::Ready);
    assert_eq!(
        r.state("a"),
        DeltaState::Idle,
        "the least recently used one went"
    );
    assert_clean(&r);
}

#[test]
fn a_prefetched_delta_is_not_kept_fresh() {
    // A hot load's prefetch: no sequence waits for it, so a load for waiting sequences may evict it.
    let r = residency_with_grace(Fake::new(200), 200, Duration::from_secs(3600));
    for n in ["a", "b", "c"] {
        r.register(n, 100).unwrap();
    }
    r.prefetch("a");
    assert_eq!(r.wait("a", BOUND), DeltaState::Ready);
    load(&r, "b");
    load(&r, "c");
    assert_eq!(
        r.state("a"),
        DeltaState::Idle,
        "the prefetched delta made room"
    );
    assert_eq!(r.state("b"), DeltaState::Ready, "b is fresh");
    assert_clean(&r);
}
