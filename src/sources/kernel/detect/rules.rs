//! The rule engine: built-in rules from `default_rules.yaml` merged with the config's rules,
//! compiled into one `RegexSet` (plus the OOM context patterns), so each message is scanned
//! once; only the rules that matched run their capturing regex.

use regex::{Captures, Regex, RegexSet};
use serde::Deserialize;
use thiserror::Error;

use super::correlate::{CONTEXT_PATTERNS, ContextKind};
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

/// What one entry of the set stands for.
#[derive(Debug, Clone, Copy)]
enum Target {
    Rule(usize),
    Context(ContextKind),
}

#[derive(Debug)]
pub struct RuleSet {
    set: RegexSet,
    /// Parallel to the set's patterns.
    regexes: Vec<Regex>,
    targets: Vec<Target>,
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
            targets.push(Target::Rule(index));
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
        let set = RegexSet::new(&patterns).map_err(RuleError::Set)?;
        Ok(RuleSet {
            set,
            regexes,
            targets,
            rules,
        })
    }

    pub fn rules(&self) -> &[KernelRule] {
        &self.rules
    }

    /// Every rule and context pattern matching `message`, in rule order, contexts last.
    pub fn matches<'r, 'h>(&'r self, message: &'h str) -> Vec<RuleMatch<'r, 'h>> {
        let matched = self.set.matches(message);
        if !matched.matched_any() {
            return Vec::new();
        }
        matched
            .iter()
            .filter_map(|index| {
                let regex = &self.regexes[index];
                Some(match self.targets[index] {
                    Target::Context(kind @ ContextKind::Summary) => RuleMatch::Context {
                        kind,
                        captures: None,
                    },
                    Target::Context(kind) => RuleMatch::Context {
                        kind,
                        captures: Some(regex.captures(message)?),
                    },
                    Target::Rule(rule) => RuleMatch::Rule {
                        rule: &self.rules[rule],
                        fields: fields_of(regex, &regex.captures(message)?),
                    },
                })
            })
            .collect()
    }
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
