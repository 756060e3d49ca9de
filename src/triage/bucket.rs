//! Groups goroutines with identical stacks, within a fixed number of groups, and tells which
//! daemon each dump came from.

use std::collections::{BTreeMap, HashMap};

use super::classify::{Evidence, WaitKind, classify, evidence};
use super::parse::{Goroutine, GoroutineSink};
use super::{Bucket, Daemon, DumpInfo, Frame, Overflow, TriageLimits, WaitRange};

/// What aggregation hands to the report.
pub(crate) struct Aggregated {
    /// In first-seen order; ids are assigned by the report.
    pub buckets: Vec<Bucket>,
    pub dumps: Vec<DumpInfo>,
    pub dumps_total: u64,
    pub dump_daemons: Vec<Daemon>,
    pub overflow: Overflow,
    pub goroutines: u64,
    pub by_kind: BTreeMap<WaitKind, u64>,
}

struct Entry {
    bucket: Bucket,
    evidence: Evidence,
    /// Daemons (as bits of [`daemon_bit`]) of the dumps this stack appeared in.
    daemons: u8,
    /// The section that last counted this entry, to list it once per section.
    last_section: u64,
}

/// The goroutines between two dump boundaries.
#[derive(Default)]
struct Section {
    /// Goroutines showing dockerd, containerd and shim packages.
    votes: [u64; 3],
    goroutines: u64,
    touched: Vec<usize>,
}

pub(crate) struct Aggregator {
    max_buckets: usize,
    max_example_ids: usize,
    max_dumps: usize,
    index: HashMap<u128, usize>,
    entries: Vec<Entry>,
    overflow: Overflow,
    goroutines: u64,
    by_kind: BTreeMap<WaitKind, u64>,
    section: Section,
    section_no: u64,
    dumps: Vec<DumpInfo>,
    dumps_total: u64,
    dump_daemons: u8,
}

const ALL_DAEMONS: [Daemon; 5] = [
    Daemon::Dockerd,
    Daemon::Containerd,
    Daemon::Shim,
    Daemon::Mixed,
    Daemon::Unknown,
];

fn daemon_bit(daemon: Daemon) -> u8 {
    1 << ALL_DAEMONS.iter().position(|d| *d == daemon).unwrap_or(4)
}

fn daemons_of(mask: u8) -> Vec<Daemon> {
    ALL_DAEMONS
        .iter()
        .copied()
        .filter(|d| mask & daemon_bit(*d) != 0)
        .collect()
}

impl Aggregator {
    pub(crate) fn new(limits: &TriageLimits) -> Self {
        Self {
            max_buckets: limits.max_buckets,
            max_example_ids: limits.max_example_ids,
            max_dumps: limits.max_dumps,
            index: HashMap::new(),
            entries: Vec::new(),
            overflow: Overflow::default(),
            goroutines: 0,
            by_kind: BTreeMap::new(),
            section: Section::default(),
            section_no: 1,
            dumps: Vec::new(),
            dumps_total: 0,
            dump_daemons: 0,
        }
    }

    pub(crate) fn finish(mut self) -> Aggregated {
        self.close_section();
        Aggregated {
            buckets: self
                .entries
                .into_iter()
                .map(|mut entry| {
                    entry.bucket.daemons = daemons_of(entry.daemons);
                    entry.bucket
                })
                .collect(),
            dumps: self.dumps,
            dumps_total: self.dumps_total,
            dump_daemons: daemons_of(self.dump_daemons),
            overflow: self.overflow,
            goroutines: self.goroutines,
            by_kind: self.by_kind,
        }
    }

    fn new_entry(&self, g: &Goroutine<'_>) -> Entry {
        let classified = classify(g.state, g.frames, g.created_by);
        Entry {
            bucket: Bucket {
                id: 0,
                kind: classified.kind,
                state: g.state.to_string(),
                site: classified.site,
                detail: classified.detail,
                count: 0,
                wait_minutes: WaitRange {
                    min: g.wait_minutes,
                    max: g.wait_minutes,
                },
                locked_to_thread: 0,
                example_ids: Vec::new(),
                daemons: Vec::new(),
                frames: g
                    .frames
                    .iter()
                    .map(|f| Frame {
                        function: f.function.clone(),
                        location: f.location.clone(),
                    })
                    .collect(),
                frames_total: g.frames_total,
                elided: g.elided,
                anchor: classified.anchor.min(g.frames.len().saturating_sub(1)),
                created_by: g.created_by.map(str::to_string),
                possible_lock_holders: Vec::new(),
            },
            evidence: evidence(g.frames, g.created_by),
            daemons: 0,
            last_section: 0,
        }
    }

    fn vote(&mut self, evidence: Evidence) {
        for (slot, shown) in [evidence.dockerd, evidence.containerd, evidence.shim]
            .into_iter()
            .enumerate()
        {
            self.section.votes[slot] += u64::from(shown);
        }
    }

    fn close_section(&mut self) {
        let section = std::mem::take(&mut self.section);
        self.section_no += 1;
        if section.goroutines == 0 {
            return;
        }
        let daemon = decide(section.votes);
        self.dumps_total += 1;
        self.dump_daemons |= daemon_bit(daemon);
        if self.dumps.len() < self.max_dumps {
            self.dumps.push(DumpInfo {
                daemon,
                goroutines: section.goroutines,
            });
        }
        for index in section.touched {
            self.entries[index].daemons |= daemon_bit(daemon);
        }
    }
}

/// The daemon with the most goroutines showing its packages; `Mixed` when a second one comes
/// close (concatenated dumps). Ties favour the shim, then containerd: a shim links containerd
/// packages and containerd links client packages that dockerd also has.
fn decide(votes: [u64; 3]) -> Daemon {
    let [dockerd, containerd, shim] = votes;
    let mut ranked = [
        (shim, Daemon::Shim),
        (containerd, Daemon::Containerd),
        (dockerd, Daemon::Dockerd),
    ];
    ranked.sort_by_key(|r| std::cmp::Reverse(r.0));
    let (best, daemon) = ranked[0];
    let second = ranked[1].0;
    if best == 0 {
        Daemon::Unknown
    } else if second > 0 && second * 2 >= best {
        Daemon::Mixed
    } else {
        daemon
    }
}

impl GoroutineSink for Aggregator {
    fn goroutine(&mut self, g: &Goroutine<'_>) {
        self.goroutines += 1;
        self.section.goroutines += 1;
        let index = match self.index.get(&g.stack_hash) {
            Some(&index) => Some(index),
            None if self.entries.len() < self.max_buckets => {
                let entry = self.new_entry(g);
                self.entries.push(entry);
                self.index.insert(g.stack_hash, self.entries.len() - 1);
                Some(self.entries.len() - 1)
            }
            None => None,
        };
        let (kind, evidence) = match index {
            Some(index) => {
                let max_example_ids = self.max_example_ids;
                let entry = &mut self.entries[index];
                let bucket = &mut entry.bucket;
                bucket.count += 1;
                bucket.wait_minutes.min = bucket.wait_minutes.min.min(g.wait_minutes);
                bucket.wait_minutes.max = bucket.wait_minutes.max.max(g.wait_minutes);
                bucket.locked_to_thread += u64::from(g.locked_to_thread);
                if bucket.example_ids.len() < max_example_ids {
                    bucket.example_ids.push(g.id);
                }
                if entry.last_section != self.section_no {
                    entry.last_section = self.section_no;
                    self.section.touched.push(index);
                }
                (bucket.kind, entry.evidence)
            }
            None => {
                let kind = classify(g.state, g.frames, g.created_by).kind;
                self.overflow.goroutines += 1;
                *self.overflow.by_kind.entry(kind).or_default() += 1;
                self.overflow.max_wait_minutes = self.overflow.max_wait_minutes.max(g.wait_minutes);
                (kind, evidence(g.frames, g.created_by))
            }
        };
        *self.by_kind.entry(kind).or_default() += 1;
        self.vote(evidence);
    }

    fn dump_start(&mut self) {
        self.close_section();
    }

    fn dump_end(&mut self) {
        self.close_section();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn daemon_decision() {
        assert_eq!(decide([10, 0, 0]), Daemon::Dockerd);
        assert_eq!(decide([0, 7, 1]), Daemon::Containerd);
        assert_eq!(decide([0, 3, 3]), Daemon::Mixed);
        assert_eq!(decide([10, 6, 0]), Daemon::Mixed);
        assert_eq!(decide([0, 0, 0]), Daemon::Unknown);
        assert_eq!(decide([0, 1, 9]), Daemon::Shim);
    }

    #[test]
    fn daemon_bits_round_trip() {
        for daemon in ALL_DAEMONS {
            assert_eq!(daemons_of(daemon_bit(daemon)), vec![daemon]);
        }
    }
}
