"""Policy: the YAML the security team writes, loaded into frozen objects.

Strategy: `loader` composes the file with line numbers and validates it; the
model is immutable so a reload swaps one object for another and a session
always sees a whole policy. Evaluation (a pure function from principal and
analysed statement to a verdict) arrives with the policy language work.
"""

from proxy.policy.loader import Policy, PolicyError, Role, load_policy, parse_policy

__all__ = ["Policy", "PolicyError", "Role", "load_policy", "parse_policy"]
