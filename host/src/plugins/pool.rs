//! How plugin instances get their memory, sized from the address space the process may use.
//!
//! The default pool reserves wasmtime's 4 GiB (+ guard) per linear memory slot up front, so
//! compiled code needs no bounds checks: about 516 GiB of address space for 64 instances, which
//! costs nothing on an ordinary host but fails outright under `ulimit -v` / `RLIMIT_AS`, as
//! containers and batch systems set it. Under such a limit the host sizes a compact pool
//! (128 MiB slots, bounds-checked code) from what is left, or falls back to on-demand
//! allocation when even that does not fit or the reservation fails, and says what it chose.
//! `KEEL_PLUGIN_POOL` overrides the choice.

use std::sync::atomic::{AtomicU64, Ordering};

use wasmtime::{Config, Engine, InstanceAllocationStrategy};

use super::{Allocation, PluginError, pooling_config};

/// `auto` (default), `off` (on-demand allocation) or a number of pooled instances.
pub const POOL_ENV: &str = "KEEL_PLUGIN_POOL";

/// Reservation per linear memory when the address space is limited: twice the default plugin
/// memory limit, and then also the most memory a plugin gets.
const COMPACT_MEMORY: u64 = 128 << 20;
/// Guard after (and before) a compact memory: small, the code is bounds-checked anyway.
const COMPACT_GUARD: u64 = 64 << 10;
/// Address space of one pooled instance with the default layout: two 4 GiB memory slots with
/// their 32 MiB guards, a 2 MiB fiber stack and four 100,000-element tables.
const DEFAULT_INSTANCE: u64 = 2 * ((4 << 30) + (64 << 20)) + (6 << 20);
/// The same with the compact layout (one memory slot per instance, a few spare).
const COMPACT_INSTANCE: u64 = COMPACT_MEMORY + 2 * COMPACT_GUARD + (6 << 20);
/// A pool smaller than this is not worth its reservation; allocate on demand instead.
const MIN_POOLED: u32 = 4;

/// The most linear memory one plugin may have, whatever its `memory_limit` says: set when the
/// runtime starts, `u64::MAX` unless the address space is limited.
static PLUGIN_MEMORY_CAP: AtomicU64 = AtomicU64::new(u64::MAX);

pub(crate) fn plugin_memory_cap() -> u64 {
    PLUGIN_MEMORY_CAP.load(Ordering::Relaxed)
}

/// What the runtime will use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Plan {
    pub allocation: Allocation,
    /// Compact memory reservations (bounds-checked code) instead of wasmtime's 4 GiB ones.
    pub compact: bool,
    /// Cap on each plugin's linear memory.
    pub memory_cap: u64,
    /// What was chosen and why, when it is not what was asked for: logged as a warning.
    pub note: Option<String>,
}

/// The allocation `KEEL_PLUGIN_POOL` asks for, `requested` when it is unset or `auto`.
pub(crate) fn from_env(requested: Allocation) -> Result<Allocation, PluginError> {
    let Ok(value) = std::env::var(POOL_ENV) else { return Ok(requested) };
    parse_knob(&value, requested).ok_or_else(|| {
        PluginError::Engine(format!(
            "{POOL_ENV}={value:?}: expected `auto`, `off` (on-demand allocation) or a number of pooled plugin instances"
        ))
    })
}

fn parse_knob(value: &str, requested: Allocation) -> Option<Allocation> {
    match value.trim() {
        "" | "auto" => Some(requested),
        "off" | "on-demand" | "0" => Some(Allocation::OnDemand),
        n => {
            let plugin_instances: u32 = n.parse().ok()?;
            let keep_resident_bytes = match requested {
                Allocation::Pooling { keep_resident_bytes, .. } => keep_resident_bytes,
                Allocation::OnDemand => super::DEFAULT_KEEP_RESIDENT,
            };
            Some(Allocation::Pooling { plugin_instances, keep_resident_bytes })
        }
    }
}

/// Chooses the allocation for an address space limit of `limit` bytes (`None`: unlimited) of
/// which `used` are taken already. Half of what is left goes to plugins: the host's own heap,
/// threads and compiler need the rest.
pub(crate) fn plan(requested: Allocation, limit: Option<u64>, used: u64) -> Plan {
    let as_asked = Plan { allocation: requested, compact: false, memory_cap: u64::MAX, note: None };
    let Some(limit) = limit else { return as_asked };
    let budget = limit.saturating_sub(used) / 2;
    let limited = format!("the address space is limited to {} (RLIMIT_AS; {} in use)", mib(limit), mib(used));
    match requested {
        Allocation::Pooling { plugin_instances, keep_resident_bytes } => {
            if u64::from(plugin_instances).saturating_mul(DEFAULT_INSTANCE) <= budget {
                return as_asked;
            }
            let fits = u32::try_from(budget / COMPACT_INSTANCE).unwrap_or(u32::MAX).min(plugin_instances);
            if fits >= MIN_POOLED {
                Plan {
                    allocation: Allocation::Pooling {
                        plugin_instances: fits,
                        keep_resident_bytes: keep_resident_bytes.min(COMPACT_MEMORY as usize),
                    },
                    compact: true,
                    memory_cap: COMPACT_MEMORY,
                    note: Some(format!(
                        "{limited}: plugin instance pool sized to {fits} instances (asked for {plugin_instances}) with {} of memory each; a plugin's memory_limit above that is cut to it ({POOL_ENV}=off allocates on demand instead)",
                        mib(COMPACT_MEMORY)
                    )),
                }
            } else {
                on_demand(&limited, budget, &format!("too little for a pool of {MIN_POOLED} plugin instances"))
            }
        }
        Allocation::OnDemand => {
            if budget >= 16 * DEFAULT_INSTANCE {
                return as_asked;
            }
            on_demand(&limited, budget, "plugin memories are reserved compactly")
        }
    }
}

fn on_demand(limited: &str, budget: u64, why: &str) -> Plan {
    let memory_cap = budget.max(COMPACT_MEMORY);
    Plan {
        allocation: Allocation::OnDemand,
        compact: true,
        memory_cap,
        note: Some(format!(
            "{limited}: {why}; plugin instances are allocated on demand with at most {} of memory each",
            mib(memory_cap)
        )),
    }
}

fn mib(bytes: u64) -> String {
    if bytes >= 1 << 30 && bytes.is_multiple_of(1 << 30) {
        format!("{} GiB", bytes >> 30)
    } else {
        format!("{} MiB", bytes >> 20)
    }
}

/// Sets `config`'s allocation strategy and memory layout for `plan`.
fn apply(config: &mut Config, plan: &Plan) {
    if plan.compact {
        config.memory_reservation(COMPACT_MEMORY);
        config.memory_guard_size(COMPACT_GUARD);
        // On demand, a memory that outgrows its reservation moves; this much room comes with it.
        config.memory_reservation_for_growth(COMPACT_MEMORY / 2);
    }
    if let Allocation::Pooling { plugin_instances, keep_resident_bytes } = plan.allocation {
        let mut pool = pooling_config(plugin_instances, keep_resident_bytes);
        if plan.compact {
            pool.max_memory_size(COMPACT_MEMORY as usize).total_memories(plugin_instances.saturating_add(MIN_POOLED));
        }
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    }
}

/// The engine for `requested`, adapted to the address space limit; `base` makes the rest of
/// the engine's configuration. Returns the allocation actually used.
pub(crate) fn engine(requested: Allocation, base: impl Fn() -> Config) -> Result<(Engine, Allocation), PluginError> {
    let plan = plan(requested, address_space_limit(), address_space_used());
    match &plan.note {
        Some(note) => tracing::warn!(plugin.allocation = ?plan.allocation, "{note}"),
        None => tracing::debug!(plugin.allocation = ?plan.allocation, "plugin instance allocation"),
    }
    PLUGIN_MEMORY_CAP.store(plan.memory_cap, Ordering::Relaxed);
    let mut config = base();
    apply(&mut config, &plan);
    match Engine::new(&config) {
        Ok(engine) => Ok((engine, plan.allocation)),
        Err(error) if matches!(plan.allocation, Allocation::Pooling { .. }) => {
            // Reserving the pool can fail for reasons no limit shows (overcommit settings, a
            // fragmented address space): the host still works, more slowly.
            let budget = address_space_limit().map_or(u64::MAX, |l| l.saturating_sub(address_space_used()) / 2);
            let fallback = on_demand("the plugin instance pool cannot be reserved", budget, &format!("{error:#}"));
            tracing::warn!(plugin.allocation = ?fallback.allocation, "{}", fallback.note.as_deref().unwrap_or_default());
            PLUGIN_MEMORY_CAP.store(fallback.memory_cap, Ordering::Relaxed);
            let mut config = base();
            apply(&mut config, &fallback);
            let engine = Engine::new(&config).map_err(|e| PluginError::Engine(format!("{e:#}")))?;
            Ok((engine, fallback.allocation))
        }
        Err(error) => Err(PluginError::Engine(format!("{error:#}"))),
    }
}

/// The soft `RLIMIT_AS` in bytes, `None` when unlimited (or not on Linux). Read from /proc so
/// the host needs no unsafe `getrlimit` call.
fn address_space_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    parse_limits(&limits)
}

fn parse_limits(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("Max address space"))?;
    let soft = line.trim_start_matches("Max address space").split_whitespace().next()?;
    soft.parse().ok()
}

/// The process's current address space (`VmSize`), 0 when unknown.
fn address_space_used() -> u64 {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else { return 0 };
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmSize:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULT: Allocation = Allocation::Pooling { plugin_instances: 64, keep_resident_bytes: 4 << 20 };

    #[test]
    fn unlimited_keeps_what_was_asked() {
        assert_eq!(plan(DEFAULT, None, 1 << 30).allocation, DEFAULT);
        assert!(plan(DEFAULT, None, 0).note.is_none());
        assert_eq!(plan(DEFAULT, Some(1 << 40), 1 << 30).allocation, DEFAULT);
    }

    #[test]
    fn two_gib_gets_a_small_compact_pool() {
        let p = plan(DEFAULT, Some(2 << 30), 300 << 20);
        let Allocation::Pooling { plugin_instances, .. } = p.allocation else { panic!("{p:?}") };
        assert!((MIN_POOLED..64).contains(&plugin_instances), "{p:?}");
        assert!(p.compact && p.memory_cap == COMPACT_MEMORY);
        assert!(p.note.unwrap().contains("limited to 2 GiB"));
    }

    #[test]
    fn too_little_falls_back_to_on_demand() {
        let p = plan(DEFAULT, Some(600 << 20), 300 << 20);
        assert_eq!(p.allocation, Allocation::OnDemand);
        assert!(p.compact);
        assert!(p.note.unwrap().contains("on demand"));
    }

    #[test]
    fn knob() {
        assert_eq!(parse_knob("auto", DEFAULT), Some(DEFAULT));
        assert_eq!(parse_knob("off", DEFAULT), Some(Allocation::OnDemand));
        assert_eq!(
            parse_knob("8", DEFAULT),
            Some(Allocation::Pooling { plugin_instances: 8, keep_resident_bytes: 4 << 20 })
        );
        assert_eq!(parse_knob("lots", DEFAULT), None);
    }

    #[test]
    fn proc_limits() {
        let unlimited = "Limit                     Soft Limit           Hard Limit           Units     \n\
                         Max address space         unlimited            unlimited            bytes     \n";
        assert_eq!(parse_limits(unlimited), None);
        let two = "Max address space         2147483648           unlimited            bytes     \n";
        assert_eq!(parse_limits(two), Some(2 << 30));
    }
}
