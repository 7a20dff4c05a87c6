"""Policy: the YAML the security team writes, loaded into frozen objects.

Strategy: `marked` composes YAML with line numbers, `validate` checks it and
builds the `model` objects, `loader` ties them together, and `schema` compares
a loaded policy with a database's columns for `pgwarden check --schema`. The
model is immutable so a reload swaps one object for another and a session
always sees a whole policy. Evaluation (a pure function from principal and
analysed statement to a verdict) arrives with the policy engine.
"""

from proxy.policy.loader import PolicyError, load_policy, parse_policy
from proxy.policy.model import ColumnRule, Limits, Policy, Role

__all__ = ["ColumnRule", "Limits", "Policy", "PolicyError", "Role", "load_policy", "parse_policy"]
