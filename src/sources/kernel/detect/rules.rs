//! The rule engine: built-in rules from `default_rules.yaml` merged with the config's rules,
//! plus the OOM context patterns. A pattern anchored at `^` whose matches all begin with one
//! of a few literals (all built-in ones but one) runs only on messages that start with one of
//! them; the others are compiled into one `RegexSet`, so each message is scanned once. Only
//! the patterns that matched run their capturing regex.
//!
//! Why not one set of all patterns: a set search must run to the end of every message to
//! find every pattern that matches, and one unanchored pattern makes the whole set search
//! unanchored. The literal test costs a few comparisons of the message's first bytes.

use regex::{Captures, Regex, RegexSet};
use regex_syntax::hir::Look;
use regex_syntax::hir::literal::{ExtractKind, Extractor};
use serde::Deserialize;
use thiserror::Error;

use super::correlate::{CONTEXT_PATTERNS, ContextKind, SummaryLine};
use super::event::EventFields;
use crate::config::KernelRule;

/// The built-in rules, embedded at build time.
pub const DEFAULT_RULES_YAML: &str = include_str!("default_rules.yaml");

/// The rule whose events carry [`OomInfo`](super::OomInfo).
pub const OOM_KILL_RULE: &str = "oom_kill";
/// The rule whose events carry a [`HungTaskScope`](super::HungTaskScope).
pub const HUNG_TASK_RULE: &str = "hung_task";

#[derive(Debug, Error)]
pub enum RuleError {
    #[error("built-in kernel rules do not parse: {0}")]
    BuiltIn(String),
    #[error("a kernel rule has an empty name")]
    EmptyName,
    #[error("kernel rule `{name}`: pattern does not compile: {source}")]
    Pattern { name: String, source: regex::Error },
    #[error("kernel rules do not compile into one set: {0}")]
    Set(regex::Error),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    rules: Vec<KernelRule>,
}

/// The built-in rules, in file order.
pub fn default_rules() -> Result<Vec<KernelRule>, RuleError> {
    serde_saphyr::from_str::<RuleFile>(DEFAULT_RULES_YAML)
        .map(|file| file.rules)
        .map_err(|e| RuleError::BuiltIn(e.to_string()))
}

/// Built-in rules with the user's applied: a user rule replaces the rule of the same name in
/// place, or is appended.
pub fn effective_rules(user_rules: &[KernelRule]) -> Result<Vec<KernelRule>, RuleError> {
    let mut rules = default_rules()?;
    for rule in user_rules {
        match rules.iter_mut().find(|r| r.name == rule.name) {
            Some(existing) => *existing = rule.clone(),
            None => rules.push(rule.clone()),
        }
    }
    Ok(rules)
}

/// What one pattern stands for.
#[derive(Debug, Clone, Copy)]
enum Target {
    /// A rule, by index; `killed_process`: it is the built-in `oom_kill` rule as written, so
    /// its fields can come from [`KilledProcessLine`] instead of the pattern's captures.
    Rule {
        index: usize,
        killed_process: bool,
    },
    Context(ContextKind),
}

/// More literal prefixes than this and a pattern is searched in the set instead.
const MAX_GATE_LITERALS: usize = 16;
/// Up to this many patterns without a gate are searched one by one rather than as a set: a
/// regex of its own finds an inner literal with `memchr` (hard_lockup's "Watchdog detected
/// hard LOCKUP"), which a set search, looking for every pattern at once, cannot.
const MAX_SEARCHED_ALONE: usize = 4;

#[derive(Debug)]
pub struct RuleSet {
    /// Rules first, in rule order, then the context patterns.
    regexes: Vec<Regex>,
    targets: Vec<Target>,
    /// Parallel to `regexes`: the literals one of which every match starts the message with,
    /// for the patterns that have them.
    gates: Vec<Option<Vec<Box<[u8]>>>>,
    /// The patterns without a gate, in one set when there are many; `ungated[i]` is the
    /// index of the set's pattern `i`.
    set: Option<RegexSet>,
    ungated: Vec<usize>,
    rules: Vec<KernelRule>,
}

/// One rule or context pattern that matched a message.
#[derive(Debug)]
pub enum RuleMatch<'r, 'h> {
    Rule {
        rule: &'r KernelRule,
        fields: EventFields,
    },
    /// An OOM header line; the summary line comes without captures (the correlator parses
    /// it: see [`SummaryLine`](super::correlate::SummaryLine)).
    Context {
        kind: ContextKind,
        captures: Option<Captures<'h>>,
    },
}

impl RuleSet {
    /// Compile the built-in rules merged with `user_rules`.
    pub fn new(user_rules: &[KernelRule]) -> Result<RuleSet, RuleError> {
        RuleSet::from_rules(effective_rules(user_rules)?)
    }

    /// Compile exactly `rules` (plus the OOM context patterns).
    pub fn from_rules(rules: Vec<KernelRule>) -> Result<RuleSet, RuleError> {
        let built_in_oom_kill = default_rules()?
            .into_iter()
            .find(|r| r.name == OOM_KILL_RULE)
            .map(|r| r.pattern)
            .unwrap_or_default();
        let mut patterns = Vec::new();
        let mut targets = Vec::new();
        let mut regexes = Vec::new();
        for (index, rule) in rules.iter().enumerate() {
            if rule.name.is_empty() {
                return Err(RuleError::EmptyName);
            }
            let regex = Regex::new(&rule.pattern).map_err(|source| RuleError::Pattern {
                name: rule.name.clone(),
                source,
            })?;
            patterns.push(rule.pattern.as_str());
            regexes.push(regex);
            targets.push(Target::Rule {
                index,
                killed_process: rule.name == OOM_KILL_RULE && rule.pattern == built_in_oom_kill,
            });
        }
        for (kind, pattern) in CONTEXT_PATTERNS {
            let regex = Regex::new(pattern).map_err(|source| RuleError::Pattern {
                name: format!("{kind:?}"),
                source,
            })?;
            patterns.push(pattern);
            regexes.push(regex);
            targets.push(Target::Context(kind));
        }
        let gates: Vec<_> = patterns.iter().map(|p| literal_gate(p)).collect();
        let ungated: Vec<usize> = (0..patterns.len())
            .filter(|&i| gates[i].is_none())
            .collect();
        let set = if ungated.len() > MAX_SEARCHED_ALONE {
            Some(RegexSet::new(ungated.iter().map(|&i| patterns[i])).map_err(RuleError::Set)?)
        } else {
            None
        };
        Ok(RuleSet {
            regexes,
            targets,
            gates,
            set,
            ungated,
            rules,
        })
    }

    pub fn rules(&self) -> &[KernelRule] {
        &self.rules
    }

    /// Every rule and context pattern matching `message`, in rule order, contexts last.
    pub fn matches<'r, 'h>(&'r self, message: &'h str) -> Vec<RuleMatch<'r, 'h>> {
        let start = message.as_bytes();
        let from_set = self.set.as_ref().map(|set| set.matches(message));
        let mut from_set = from_set
            .iter()
            .flat_map(|m| m.iter())
            .map(|i| self.ungated[i])
            .peekable();
        let mut found = Vec::new();
        for (index, regex) in self.regexes.iter().enumerate() {
            let candidate = match &self.gates[index] {
                Some(literals) => literals.iter().any(|l| start.starts_with(l)),
                None if self.set.is_some() => from_set.next_if_eq(&index).is_some(),
                None => regex.is_match(message),
            };
            if !candidate {
                continue;
            }
            let matched = match self.targets[index] {
                // Its fields are parsed by their keys (see `SummaryLine`), and for a plain
                // line the parser also decides: where it finds no summary, the correlator
                // would take none from the pattern's match either.
                Target::Context(kind @ ContextKind::Summary) => {
                    let summary = if plain(message) {
                        SummaryLine::parse(message).is_some()
                    } else {
                        regex.is_match(message)
                    };
                    summary.then_some(RuleMatch::Context {
                        kind,
                        captures: None,
                    })
                }
                Target::Context(kind) => {
                    regex.captures(message).map(|captures| RuleMatch::Context {
                        kind,
                        captures: Some(captures),
                    })
                }
                Target::Rule {
                    index,
                    killed_process,
                } => {
                    let fields = if killed_process && plain(message) {
                        KilledProcessLine::parse(message).map(KilledProcessLine::fields)
                    } else {
                        regex.captures(message).map(|c| fields_of(regex, &c))
                    };
                    fields.map(|fields| RuleMatch::Rule {
                        rule: &self.rules[index],
                        fields,
                    })
                }
            };
            found.extend(matched);
        }
        found
    }
}

/// The literals one of which every match of `pattern` starts the message with: None unless
/// the pattern is anchored at the start (`^`, not multi-line) and its prefixes are few and
/// finite. A necessary condition only: the pattern itself decides.
fn literal_gate(pattern: &str) -> Option<Vec<Box<[u8]>>> {
    let hir = regex_syntax::parse(pattern).ok()?;
    if !hir.properties().look_set_prefix().contains(Look::Start) {
        return None;
    }
    let prefixes = Extractor::new().kind(ExtractKind::Prefix).extract(&hir);
    let literals = prefixes.literals()?;
    if literals.is_empty()
        || literals.len() > MAX_GATE_LITERALS
        || literals.iter().any(|l| l.as_bytes().is_empty())
    {
        return None;
    }
    Some(literals.iter().map(|l| l.as_bytes().into()).collect())
}

/// The groups of the built-in `oom_kill` pattern, found by their keys: its `\((?P<comm>.*)\)`
/// makes the capturing engines run over the whole line, the largest cost per record of an
/// OOM storm. For a [`plain`] line, Some exactly where the pattern matches, with the same
/// captures (a test holds them equal); other lines are left to the pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
struct KilledProcessLine<'a> {
    pid: &'a str,
    comm: &'a str,
    anon_rss_kb: &'a str,
}

impl<'a> KilledProcessLine<'a> {
    /// The pattern's prefixes, in the order it tries them.
    const PREFIXES: [&'static str; 4] = [
        "Memory cgroup out of memory: ",
        "Out of memory (oom_kill_allocating_task): ",
        "Out of memory: ",
        "",
    ];

    fn parse(message: &'a str) -> Option<KilledProcessLine<'a>> {
        if !plain(message) {
            return None;
        }
        let rest = Self::PREFIXES
            .iter()
            .find_map(|p| message.strip_prefix(p)?.strip_prefix("Killed process "))?;
        let (pid, rest) = split_digits(rest)?;
        let rest = rest.strip_prefix(" (")?;
        // The comm is greedy: it ends at the last `)` after which the rest fits.
        rest.rmatch_indices(')').find_map(|(at, _)| {
            Some(KilledProcessLine {
                pid,
                comm: rest.get(..at)?,
                anon_rss_kb: Self::after_comm(rest.get(at..)?)?,
            })
        })
    }

    /// `\),? (?:UID \d+, )?total-vm:\d+kB, anon-rss:(\d+)kB`: the anon-rss digits.
    fn after_comm(tail: &str) -> Option<&str> {
        let tail = tail.strip_prefix(')')?;
        let tail = tail.strip_prefix(',').unwrap_or(tail).strip_prefix(' ')?;
        let tail = match tail
            .strip_prefix("UID ")
            .and_then(split_digits)
            .and_then(|(_, t)| t.strip_prefix(", "))
        {
            Some(after_uid) => after_uid,
            None => tail,
        };
        let (_, tail) = split_digits(tail.strip_prefix("total-vm:")?)?;
        let (rss, tail) = split_digits(tail.strip_prefix("kB, anon-rss:")?)?;
        tail.starts_with("kB").then_some(rss)
    }

    fn fields(self) -> EventFields {
        let mut fields = EventFields::default();
        fields.insert("pid", self.pid);
        fields.insert("comm", self.comm);
        fields.insert("anon_rss_kb", self.anon_rss_kb);
        fields
    }
}

/// A line the parsers read exactly as the patterns do: all ASCII (a pattern's `\d` and `\w`
/// take other scripts' too) and one line (a pattern's `.` stops at a newline).
fn plain(message: &str) -> bool {
    message.is_ascii() && !message.contains('\n')
}

/// The digits `text` starts with (at least one), and the rest.
fn split_digits(text: &str) -> Option<(&str, &str)> {
    let end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, rest) = (text.get(..end)?, text.get(end..)?);
    (!digits.is_empty()).then_some((digits, rest))
}

/// The named groups that took part in the match.
fn fields_of(regex: &Regex, captures: &Captures<'_>) -> EventFields {
    let mut fields = EventFields::default();
    for name in regex.capture_names().flatten() {
        if let Some(value) = captures.name(name) {
            fields.insert(name, value.as_str());
        }
    }
    fields
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{RuleKind, Severity};
    use std::time::Duration;

    fn matched_rules(set: &RuleSet, message: &str) -> Vec<String> {
        set.matches(message)
            .into_iter()
            .filter_map(|m| match m {
                RuleMatch::Rule { rule, .. } => Some(rule.name.clone()),
                RuleMatch::Context { .. } => None,
            })
            .collect()
    }

    #[test]
    fn built_in_rules_parse_and_have_the_documented_names() {
        let names: Vec<String> = default_rules()
            .unwrap()
            .into_iter()
            .map(|r| r.name)
            .collect();
        assert_eq!(
            names,
            [
                "oom_kill",
                "hung_task",
                "unregister_netdevice",
                "soft_lockup",
                "hard_lockup",
                "rcu_stall",
                "fs_readonly",
                "fs_error",
                "pids_limit",
                "conntrack_full"
            ]
        );
        RuleSet::new(&[]).unwrap();
    }

    #[test]
    fn user_rule_overrides_by_name_in_place_or_is_added() {
        let user = vec![
            KernelRule {
                name: "hung_task".into(),
                pattern: "^INFO: task (?P<comm>.+):(?P<pid>\\d+) blocked".into(),
                severity: Severity::Info,
                kind: RuleKind::Condition,
                clear_after: Some(Duration::from_secs(60)),
            },
            KernelRule {
                name: "my_rule".into(),
                pattern: "^hello (?P<who>\\w+)".into(),
                severity: Severity::Warning,
                kind: RuleKind::Temporary,
                clear_after: None,
            },
        ];
        let set = RuleSet::new(&user).unwrap();
        assert_eq!(set.rules()[1].name, "hung_task");
        assert_eq!(set.rules()[1].severity, Severity::Info);
        assert_eq!(set.rules().last().unwrap().name, "my_rule");
        assert_eq!(set.rules().len(), 11);
        assert_eq!(matched_rules(&set, "hello world"), ["my_rule"]);
        assert_eq!(
            matched_rules(&set, "INFO: task x:1 blocked for a while"),
            ["hung_task"]
        );
    }

    #[test]
    fn bad_user_pattern_names_the_rule() {
        let user = vec![KernelRule {
            name: "broken".into(),
            pattern: "(".into(),
            severity: Severity::Warning,
            kind: RuleKind::Temporary,
            clear_after: None,
        }];
        let e = RuleSet::new(&user).unwrap_err();
        assert!(e.to_string().contains("broken"), "{e}");
    }

    #[test]
    fn captures_come_from_the_matching_rule_only() {
        let set = RuleSet::new(&[]).unwrap();
        let found = set.matches("INFO: task runc:[2:INIT]:4242 blocked for more than 120 seconds.");
        assert_eq!(found.len(), 1);
        let RuleMatch::Rule { rule, fields } = &found[0] else {
            panic!("expected a rule match");
        };
        assert_eq!(rule.name, "hung_task");
        assert_eq!(fields.comm.as_deref(), Some("runc:[2:INIT]"));
        assert_eq!(fields.pid, Some(4242));
        assert_eq!(fields.seconds, Some(120));
        assert!(fields.extra.is_empty());
        assert!(set.matches("systemd[1]: Started Session 3.").is_empty());
    }

    /// What matched, by name: the rule's, or the context's kind.
    fn names(found: &[RuleMatch<'_, '_>]) -> Vec<String> {
        found
            .iter()
            .map(|m| match m {
                RuleMatch::Rule { rule, .. } => rule.name.clone(),
                RuleMatch::Context { kind, .. } => format!("{kind:?}"),
            })
            .collect()
    }

    /// What one set of every pattern, with no literal test, says matches.
    fn reference_names(set: &RuleSet, reference: &RegexSet, message: &str) -> Vec<String> {
        reference
            .matches(message)
            .iter()
            .map(|i| match set.targets[i] {
                Target::Rule { index, .. } => set.rules[index].name.clone(),
                Target::Context(kind) => format!("{kind:?}"),
            })
            .collect()
    }

    #[test]
    fn built_in_patterns_but_the_unanchored_one_are_tested_by_their_first_bytes() {
        let set = RuleSet::new(&[]).unwrap();
        let ungated: Vec<String> = set
            .ungated
            .iter()
            .map(|&i| match set.targets[i] {
                Target::Rule { index, .. } => set.rules[index].name.clone(),
                Target::Context(kind) => format!("{kind:?}"),
            })
            .collect();
        assert_eq!(ungated, ["hard_lockup"]);
        let oom = set.gates[0].as_ref().unwrap();
        assert!(
            oom.iter().any(|l| l.as_ref() == b"Killed process "),
            "{oom:?}"
        );
    }

    #[test]
    fn the_literal_test_never_changes_what_matches() {
        let user = vec![
            KernelRule {
                name: "unanchored".into(),
                pattern: "hello (?P<who>\\w+)".into(),
                severity: Severity::Warning,
                kind: RuleKind::Temporary,
                clear_after: None,
            },
            KernelRule {
                name: "case_blind".into(),
                pattern: "(?i)^nfs: server (?P<server>\\S+) not responding".into(),
                severity: Severity::Warning,
                kind: RuleKind::Temporary,
                clear_after: None,
            },
            KernelRule {
                name: "multi_line".into(),
                pattern: "(?m)^second line".into(),
                severity: Severity::Warning,
                kind: RuleKind::Temporary,
                clear_after: None,
            },
            KernelRule {
                name: "class_first".into(),
                pattern: "^[a-z]+: link (?:up|down)".into(),
                severity: Severity::Info,
                kind: RuleKind::Temporary,
                clear_after: None,
            },
        ];
        let mut user = user;
        user.push(KernelRule {
            name: "anywhere".into(),
            pattern: "link is not ready".into(),
            ..user[0].clone()
        });
        // Built-in alone: the one unanchored pattern is searched alone; with the user's
        // patterns, enough are unanchored to be searched as a set.
        let alone = RuleSet::new(&[]).unwrap();
        let with_user = RuleSet::new(&user).unwrap();
        assert!(alone.set.is_none());
        assert!(with_user.set.is_some());
        for set in [alone, with_user] {
            agrees_with_one_set_of_all(&set);
        }
    }

    fn agrees_with_one_set_of_all(set: &RuleSet) {
        let patterns: Vec<&str> = set.regexes.iter().map(Regex::as_str).collect();
        let reference = RegexSet::new(&patterns).unwrap();
        let corpus = [
            include_str!("../../../../tests/fixtures/kernel/linux-4.14.kmsg"),
            include_str!("../../../../tests/fixtures/kernel/linux-4.19.kmsg"),
            include_str!("../../../../tests/fixtures/kernel/linux-5.4.kmsg"),
            include_str!("../../../../tests/fixtures/kernel/linux-6.x.kmsg"),
            include_str!("../../../../tests/fixtures/kernel/rhel7-3.10.kmsg"),
            include_str!("../../../../tests/fixtures/kernel/near-misses.kmsg"),
            include_str!("../../../../tests/fixtures/kernel/hung-task-scopes.kmsg"),
            include_str!("../../../../tests/fixtures/kernel/killed-without-context.kmsg"),
            include_str!("../../../../tests/fixtures/kernel/userspace.kmsg"),
        ];
        let extra = [
            " Killed process 1 (sh) total-vm:1kB, anon-rss:1kB",
            "Killed process 1 (a) b) total-vm:1kB, anon-rss:1kB",
            "Out of memory (oom_kill_allocating_task): Killed process 7 (x) total-vm:1kB, anon-rss:2kB",
            "NFS: SERVER 10.0.0.5 NOT RESPONDING",
            "first line\nsecond line",
            "eth0: link up",
            "say hello world",
            "eth1: link is not ready",
            "BUG: soft lockup - CPU#3 stuck for 22s! [kworker/3:1:123]",
            "NMI watchdog: Watchdog detected hard LOCKUP on cpu 2",
            "Watchdog detected hard LOCKUP on cpu 2",
            "",
        ];
        let mut checked = 0;
        for message in corpus
            .iter()
            .flat_map(|text| text.lines())
            // The message of a `/dev/kmsg` record: after the header's `;`.
            .map(|line| line.split_once(';').map_or(line, |(_, m)| m))
            .chain(extra)
        {
            assert_eq!(
                names(&set.matches(message)),
                reference_names(set, &reference, message),
                "{message:?}"
            );
            checked += 1;
        }
        assert!(checked > 100, "{checked}");
    }

    #[test]
    fn killed_process_lines_parse_as_the_pattern_captures_them() {
        let rule = default_rules()
            .unwrap()
            .into_iter()
            .find(|r| r.name == OOM_KILL_RULE)
            .unwrap();
        let regex = Regex::new(&rule.pattern).unwrap();
        let lines = [
            "Memory cgroup out of memory: Killed process 3779 (sh) total-vm:43236kB, anon-rss:20104kB, file-rss:1520kB, shmem-rss:0kB, UID:0 pgtables:92kB oom_score_adj:0",
            "Out of memory: Killed process 1 (java) total-vm:1kB, anon-rss:2kB, file-rss:0kB",
            "Out of memory (oom_kill_allocating_task): Killed process 7 (x) total-vm:1kB, anon-rss:2kB",
            "Killed process 9 (runc:[2:INIT]) total-vm:1kB, anon-rss:3kB, file-rss:0kB",
            "Killed process 9 (runc:[2:INIT]), UID 0, total-vm:1kB, anon-rss:3kB, file-rss:0kB",
            "Killed process 9 (a) b), total-vm:1kB, anon-rss:3kB",
            "Killed process 9 (x) total-vm:1kB, anon-rss:3kB) total-vm:2kB, anon-rss:4kB",
            "Killed process 9 (x) total-vm:1kB, anon-rss:3kB) total-vm:2kB, anon-rss:kB",
            "Killed process 9 () total-vm:1kB, anon-rss:3kB",
            "Killed process 9 (x) UID 12, total-vm:1kB, anon-rss:3kB",
            "Killed process 9 (x) UID x, total-vm:1kB, anon-rss:3kB",
            "Killed process 9 (x)  total-vm:1kB, anon-rss:3kB",
            "Killed process 9 (x) total-vm:kB, anon-rss:3kB",
            "Killed process 9 (x) total-vm:1kB, anon-rss:3",
            "Killed process (x) total-vm:1kB, anon-rss:3kB",
            "Killed process 99999999999 (x) total-vm:1kB, anon-rss:3kB",
            "Out of memory: Kill process 1 (x) score 1 or sacrifice child",
            "Memory cgroup out of memory: Killed process x",
            "memory cgroup out of memory: Killed process 1 (x) total-vm:1kB, anon-rss:3kB",
            "Killed process 9 (a\nb) total-vm:1kB, anon-rss:3kB",
        ];
        let mut parsed = 0;
        for line in lines {
            let by_pattern = regex.captures(line).map(|c| fields_of(&regex, &c));
            let by_keys = KilledProcessLine::parse(line).map(KilledProcessLine::fields);
            assert_eq!(by_keys, by_pattern, "{line}");
            parsed += usize::from(by_keys.is_some());
        }
        assert!(parsed >= 10, "{parsed}");
        // Not ASCII: the pattern's.
        assert_eq!(
            KilledProcessLine::parse("Killed process 9 (ü) total-vm:1kB, anon-rss:3kB"),
            None
        );
    }

    #[test]
    fn context_lines_match_as_context_not_rules() {
        let set = RuleSet::new(&[]).unwrap();
        for line in [
            "oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=x,mems_allowed=0,oom_memcg=/docker/x,task_memcg=/docker/x,task=sh,pid=3779,uid=0",
            "Task in /docker/x killed as a result of limit of /docker/x",
            "Memory cgroup out of memory: Kill process 20357 (runc:[2:INIT]) score 970 or sacrifice child",
        ] {
            let found = set.matches(line);
            assert_eq!(found.len(), 1, "{line}");
            assert!(matches!(found[0], RuleMatch::Context { .. }), "{line}");
        }
    }
}
