//! A fake [`Backend`]: deltas are byte counts, uploads can be held at a gate and released by hand,
//! reads can be made to fail or panic, and every activation is checked against the GPU budget.

#![allow(dead_code)] // each test file uses a part

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use dz_scheduler_ext::Backend;

/// How long a test waits for anything before failing (never reached when the code is right).
pub const BOUND: Duration = Duration::from_secs(10);

/// A delta in host memory.
#[derive(Debug)]
pub struct FakeHost {
    pub name: String,
    pub bytes: u64,
}

/// A delta "on the GPU".
#[derive(Debug)]
pub struct FakeDevice {
    pub name: String,
    pub bytes: u64,
}

#[derive(Default)]
pub struct FakeState {
    /// Uploads wait at the gate for a permit (per name) while this is set.
    pub gated: bool,
    permits: HashMap<String, usize>,
    /// Uploads waiting at the gate now, per name.
    pub at_gate: HashMap<String, usize>,
    /// Reads of these names fail with the message.
    pub fail_read: HashMap<String, String>,
    /// Reads of these names panic.
    pub panic_read: Vec<String>,
    pub reads: HashMap<String, usize>,
    pub uploads: HashMap<String, usize>,
    /// What the "model layers" see: name -> bytes.
    pub active: HashMap<String, u64>,
    /// "activate x" / "deactivate x", in order.
    pub log: Vec<String>,
    /// Broken invariants seen by the callbacks (must stay empty).
    pub violations: Vec<String>,
}

pub struct Fake {
    gpu_budget: u64,
    st: Mutex<FakeState>,
    cv: Condvar,
}

impl Fake {
    pub fn new(gpu_budget: u64) -> Self {
        Self {
            gpu_budget,
            st: Mutex::new(FakeState::default()),
            cv: Condvar::new(),
        }
    }

    pub fn gated(gpu_budget: u64) -> Self {
        let f = Self::new(gpu_budget);
        f.state().gated = true;
        f
    }

    pub fn state(&self) -> MutexGuard<'_, FakeState> {
        self.st.lock().unwrap()
    }

    /// Lets one upload of `name` through the gate.
    pub fn release(&self, name: &str) {
        *self.state().permits.entry(name.to_owned()).or_default() += 1;
        self.cv.notify_all();
    }

    /// Opens the gate for everything.
    pub fn open(&self) {
        self.state().gated = false;
        self.cv.notify_all();
    }

    /// Waits until `n` uploads of `name` wait at the gate.
    pub fn wait_at_gate(&self, name: &str, n: usize) -> bool {
        let deadline = Instant::now() + BOUND;
        let mut st = self.state();
        while st.at_gate.get(name).copied().unwrap_or(0) < n {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            st = self.cv.wait_timeout(st, deadline - now).unwrap().0;
        }
        true
    }

    pub fn reads(&self, name: &str) -> usize {
        self.state().reads.get(name).copied().unwrap_or(0)
    }

    pub fn uploads(&self, name: &str) -> usize {
        self.state().uploads.get(name).copied().unwrap_or(0)
    }

    pub fn is_active(&self, name: &str) -> bool {
        self.state().active.contains_key(name)
    }

    pub fn violations(&self) -> Vec<String> {
        self.state().violations.clone()
    }

    pub fn log(&self) -> Vec<String> {
        self.state().log.clone()
    }
}

impl Backend for Fake {
    /// The delta's size in bytes (host and device alike).
    type Source = u64;
    type Host = FakeHost;
    type Device = FakeDevice;
    type Error = String;

    fn read(&self, name: &str, source: &u64) -> Result<FakeHost, String> {
        let mut st = self.state();
        *st.reads.entry(name.to_owned()).or_default() += 1;
        if st.panic_read.iter().any(|n| n == name) {
            drop(st);
            panic!("fake read of {name} panics");
        }
        if let Some(m) = st.fail_read.get(name) {
            return Err(m.clone());
        }
        Ok(FakeHost {
            name: name.to_owned(),
            bytes: *source,
        })
    }

    fn host_bytes(&self, host: &FakeHost) -> u64 {
        host.bytes
    }

    fn device_bytes(&self, host: &FakeHost) -> u64 {
        host.bytes
    }

    fn upload(&self, name: &str, host: &FakeHost) -> Result<FakeDevice, String> {
        let mut st = self.state();
        *st.uploads.entry(name.to_owned()).or_default() += 1;
        if host.name != name {
            st.violations.push(format!(
                "upload of {name} got the host form of {}",
                host.name
            ));
        }
        let deadline = Instant::now() + BOUND;
        *st.at_gate.entry(name.to_owned()).or_default() += 1;
        self.cv.notify_all();
        while st.gated && st.permits.get(name).copied().unwrap_or(0) == 0 {
            let now = Instant::now();
            if now >= deadline {
                return Err("fake gate: never released".into());
            }
            st = self.cv.wait_timeout(st, deadline - now).unwrap().0;
        }
        *st.at_gate.get_mut(name).unwrap() -= 1;
        if let Some(p) = st.permits.get_mut(name).filter(|p| **p > 0) {
            *p -= 1;
        }
        Ok(FakeDevice {
            name: name.to_owned(),
            bytes: host.bytes,
        })
    }

    fn activate(&self, name: &str, device: &Arc<FakeDevice>) -> Result<(), String> {
        let mut st = self.state();
        st.log.push(format!("activate {name}"));
        if device.name != name {
            st.violations.push(format!(
                "activate {name} with the device form of {}",
                device.name
            ));
        }
        if st.active.insert(name.to_owned(), device.bytes).is_some() {
            st.violations.push(format!("{name} activated twice"));
        }
        let total: u64 = st.active.values().sum();
        if total > self.gpu_budget {
            st.violations.push(format!(
                "{total} bytes active after activating {name}, budget {}",
                self.gpu_budget
            ));
        }
        Ok(())
    }

    fn deactivate(&self, name: &str) {
        let mut st = self.state();
        st.log.push(format!("deactivate {name}"));
        if st.active.remove(name).is_none() {
            st.violations
                .push(format!("{name} deactivated but was not active"));
        }
    }
}

/// A seeded xorshift (no dependency for a few random workloads).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}
