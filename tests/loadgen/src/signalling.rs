//! The signalling side of a run: how fast allocations are created and deleted, and what an
//! allocation costs the relay in memory.

use std::net::UdpSocket;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use serde::Serialize;

use crate::cpu;
use crate::traffic::Target;

/// Allocation churn: each worker, on a socket of its own, allocates (the 401 challenge, then
/// the authenticated Allocate) and deletes (Refresh with lifetime 0), again and again.
#[derive(Clone, Debug, Serialize)]
pub struct Churn {
    pub workers: usize,
    pub seconds: f64,
    /// Allocations created and deleted.
    pub cycles: u64,
    pub failures: u64,
    /// What the first failure was, for telling a relay's refusal from a lost datagram.
    pub first_failure: Option<String>,
    pub cycles_per_second: f64,
}

pub fn churn(target: &Target, workers: usize, duration: Duration) -> Result<Churn> {
    let cycles = AtomicU64::new(0);
    let failures = AtomicU64::new(0);
    let first_failure = std::sync::Mutex::new(None);
    let started = Instant::now();
    target.on_client_side(|| {
        std::thread::scope(|scope| {
            for worker in 0..workers {
                let (cycles, failures, first_failure) = (&cycles, &failures, &first_failure);
                scope.spawn(move || {
                    let user = format!("churn-{worker}");
                    // After a failure an allocation may be left on the socket's 5-tuple:
                    // the socket stays open so that no later client gets its port.
                    let mut quarantine = Vec::new();
                    while started.elapsed() < duration {
                        let Ok(mut client) = target.client() else {
                            failures.fetch_add(1, Ordering::Relaxed);
                            continue;
                        };
                        let cycle = (|| -> Result<()> {
                            target.allocate(&mut client, &user)?;
                            client.refresh(0)?;
                            Ok(())
                        })();
                        match cycle {
                            Ok(()) => {
                                cycles.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(error) => {
                                failures.fetch_add(1, Ordering::Relaxed);
                                remember(first_failure, &error);
                                quarantine.push(client);
                            }
                        }
                    }
                    drop(quarantine);
                });
            }
        });
    });
    let seconds = started.elapsed().as_secs_f64();
    let cycles = cycles.into_inner();
    Ok(Churn {
        workers,
        seconds,
        cycles,
        failures: failures.into_inner(),
        first_failure: first_failure.into_inner().unwrap_or_default(),
        cycles_per_second: cycles as f64 / seconds,
    })
}

fn remember(first: &std::sync::Mutex<Option<String>>, error: &anyhow::Error) {
    if let Ok(mut first) = first.lock() {
        first.get_or_insert_with(|| format!("{error:#}"));
    }
}

/// The relay's resident memory with this many allocations held, against none.
#[derive(Clone, Debug, Serialize)]
pub struct Memory {
    /// Allocations asked for; `allocations` were made.
    pub requested: usize,
    pub allocations: usize,
    pub resident_before: u64,
    pub resident_after: u64,
    pub bytes_per_allocation: f64,
    /// Growth of the kernel's slab per allocation (machine-wide, so it includes the load
    /// generator's one client socket per allocation as well as the relay's sockets).
    pub slab_bytes_per_allocation: f64,
    /// Allocations refused or lost on the way (quota, ports, timeouts).
    pub failures: usize,
    pub first_failure: Option<String>,
}

/// Allocations held open (their client sockets), to measure what they cost the relay.
pub struct Held {
    sockets: Vec<UdpSocket>,
    failures: usize,
    first_failure: std::sync::Mutex<Option<String>>,
}

impl Held {
    pub fn new() -> Held {
        Held {
            sockets: Vec::new(),
            failures: 0,
            first_failure: std::sync::Mutex::new(None),
        }
    }

    pub fn len(&self) -> usize {
        self.sockets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sockets.is_empty()
    }

    /// Adds allocations until `total` are held, `workers` at a time.
    pub fn grow_to(&mut self, target: &Target, total: usize, workers: usize) -> Result<()> {
        let first = self.sockets.len() + self.failures;
        let wanted = total.saturating_sub(self.sockets.len());
        let per_worker = wanted.div_ceil(workers.max(1));
        let first_failure = &self.first_failure;
        let results: Vec<(Vec<UdpSocket>, usize)> = target.on_client_side(|| {
            std::thread::scope(|scope| {
                let handles: Vec<_> = (0..workers)
                    .map(|worker| {
                        scope.spawn(move || {
                            let (mut sockets, mut failures) = (Vec::new(), 0);
                            for index in 0..per_worker {
                                let n = first + worker * per_worker + index;
                                if worker * per_worker + index >= wanted {
                                    break;
                                }
                                let held = target.client().and_then(|mut client| {
                                    target.allocate(&mut client, &format!("held-{n}"))?;
                                    Ok(client)
                                });
                                match held {
                                    Ok(client) => {
                                        if let Some(socket) = client.into_udp_socket() {
                                            sockets.push(socket);
                                        }
                                    }
                                    Err(error) => {
                                        failures += 1;
                                        remember(first_failure, &error);
                                    }
                                }
                            }
                            (sockets, failures)
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap_or_default())
                    .collect()
            })
        });
        for (sockets, failures) in results {
            self.sockets.extend(sockets);
            self.failures += failures;
        }
        Ok(())
    }

    /// The relay's memory per held allocation against `resident_before` (read before the
    /// first allocation), once it settled.
    /// `(resident, slab)`: the relay's RSS and the kernel's slab before any was held.
    pub fn measure(
        &self,
        relay_pid: u32,
        (resident_before, slab_before): (u64, u64),
        requested: usize,
    ) -> Result<Memory> {
        std::thread::sleep(Duration::from_millis(500));
        let resident_after = cpu::resident_bytes(relay_pid).context("reading the relay's RSS")?;
        let slab_after = cpu::slab_bytes()?;
        let held = self.sockets.len().max(1) as f64;
        Ok(Memory {
            requested,
            allocations: self.sockets.len(),
            resident_before,
            resident_after,
            bytes_per_allocation: resident_after.saturating_sub(resident_before) as f64 / held,
            slab_bytes_per_allocation: slab_after.saturating_sub(slab_before) as f64 / held,
            failures: self.failures,
            first_failure: self.first_failure.lock().ok().and_then(|f| f.clone()),
        })
    }
}

impl Default for Held {
    fn default() -> Self {
        Held::new()
    }
}
