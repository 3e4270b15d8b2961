//! ClusterNetworkPolicy (policy.networking.k8s.io/v1alpha2): cluster-scoped policies in two
//! tiers around the namespaced NetworkPolicies, each rule an ordered Accept, Deny or Pass.
//! Validated and typed as the compiler will read them; nothing here knows the API's shapes
//! (that is [`super::convert`]). docs/cluster-network-policy.md has the semantics.
use super::{IpNet, Protocol, Selector};

/// Where a policy is evaluated: Admin before the NetworkPolicies, Baseline after them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Tier {
    Admin,
    Baseline,
}

impl Tier {
    pub fn parse(s: &str) -> Option<Tier> {
        match s {
            "Admin" => Some(Tier::Admin),
            "Baseline" => Some(Tier::Baseline),
            _ => None,
        }
    }
}

/// What a matching rule does: Accept and Deny end the evaluation of the direction; Pass skips
/// the rest of the tier (Admin: on to the NetworkPolicies; Baseline: to the default, allow).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    Accept,
    Deny,
    Pass,
}

impl Action {
    pub fn parse(s: &str) -> Option<Action> {
        match s {
            "Accept" => Some(Action::Accept),
            "Deny" => Some(Action::Deny),
            "Pass" => Some(Action::Pass),
            _ => None,
        }
    }
}

/// Pods by their namespace's labels and their own (`namespaces` peers and subjects are this
/// with `pods` selecting everything). Host-network pods are never selected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodSet {
    pub namespaces: Selector,
    pub pods: Selector,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClusterPeer {
    Pods(PodSet),
    /// `networks`: any address in one of the prefixes, pods' included.
    Networks(Vec<IpNet>),
    /// `nodes` (experimental): the addresses of the Nodes the selector selects by their
    /// labels (host-network pods on them included, since they share the node's addresses).
    Nodes(Selector),
}

/// One entry of a rule's `protocols`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClusterPort {
    /// `tcp`/`udp`/`sctp` with `destinationPort` `number` (first == last) or `range`.
    Range(Protocol, u16, u16),
    /// `destinationNamedPort`: a container port of that name on the destination pod, of
    /// whatever protocol that container port has.
    Named(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterRule {
    /// `name`, for logs and reports.
    pub name: Option<String>,
    pub action: Action,
    /// The rule matches traffic with any of these peers; empty: no traffic (the fail-closed
    /// form of an Accept rule).
    pub peers: Vec<ClusterPeer>,
    /// `None`: `protocols` absent, any traffic (ICMP too).
    pub ports: Option<Vec<ClusterPort>>,
}

impl ClusterRule {
    /// The fail-closed form of a rule netpol cannot enforce as written (an unsupported or
    /// unreadable field), as the API defines it: an Accept rule matches no traffic; a Deny or
    /// Pass rule (or one whose action is unreadable) denies all traffic.
    pub fn fail_closed(name: Option<String>, action: Option<Action>) -> ClusterRule {
        match action {
            Some(Action::Accept) => ClusterRule { name, action: Action::Accept, peers: vec![], ports: None },
            _ => ClusterRule { name, action: Action::Deny, peers: vec![ClusterPeer::Networks(every_address())], ports: None },
        }
    }
}

/// `0.0.0.0/0` and `::/0`.
pub fn every_address() -> Vec<IpNet> {
    vec!["0.0.0.0/0".parse().expect("IPv4 default route"), "::/0".parse().expect("IPv6 default route")]
}

/// A ClusterNetworkPolicy as enforced (cluster-scoped: keyed by name).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterPolicy {
    pub name: String,
    pub tier: Tier,
    /// 0-1000, lower first within the tier (equal priorities: any order, as the API allows;
    /// netpol orders them by name).
    pub priority: u16,
    pub subject: PodSet,
    /// In the order written: the first matching rule decides.
    pub ingress: Vec<ClusterRule>,
    pub egress: Vec<ClusterRule>,
    /// The first validation problem, when there was one: the rules at fault (or, for a
    /// problem of the object itself, all of them) are in their [`ClusterRule::fail_closed`]
    /// form.
    pub invalid: Option<String>,
}

impl ClusterPolicy {
    pub fn rules(&self, dir: super::Direction) -> &[ClusterRule] {
        match dir {
            super::Direction::Ingress => &self.ingress,
            super::Direction::Egress => &self.egress,
        }
    }

    /// The evaluation order: tier, then priority, then name.
    pub fn order(&self) -> (Tier, u16, &str) {
        (self.tier, self.priority, &self.name)
    }
}
