"""Which identity a trainer's token carries: one per run, or one per namespace narrowed by policy.

A trainer may write the heartbeat of its own run and nothing else. Two ways to enforce that:

- ``run``: a ServiceAccount, Role (``resourceNames``: the run) and RoleBinding per run. Works
  on every supported minor, but costs three writes per run, and RBAC writes are the slowest
  a server takes in a burst (kube-apiserver 1.36: ~100 ms each with many in flight, against
  ~13 ms for a pod; benchmarks/README.md).
- ``namespace``: one ``trainguard-trainer`` ServiceAccount, Role and RoleBinding per namespace,
  created with the namespace's first run; the Role alone would let any trainer patch any run
  in the namespace, so the ValidatingAdmissionPolicy ``trainguard-trainer-own-run`` (installed
  by the chart and manifests/rbac; GA in 1.30) admits a trainer's write only to the run whose
  current pod (``status.podName``) holds the token — the pod name bound into the token,
  ``authentication.kubernetes.io/pod-name``, 1.30+ — and only to the heartbeat's two
  annotations. No per-run RBAC, nothing but the pod on the path to it.

``auto`` (the default) takes ``namespace`` when the policy and its binding are installed and
``run`` otherwise (1.28-1.29, or an install without the policy): never a shared identity
without the policy that narrows it.
"""

from __future__ import annotations

from trainguard.domain.builders import NAMESPACE_IDENTITY, RUN_IDENTITY, TRAINER_POLICY

CHOICES = ('auto', NAMESPACE_IDENTITY, RUN_IDENTITY)


def resolve(choice: str, policy_installed: bool) -> tuple[str, str, bool]:
    """(identity, a log line saying why, whether that line is a warning)."""
    if choice == RUN_IDENTITY:
        return (RUN_IDENTITY, 'trainer identity: a ServiceAccount and Role per run (TRAINGUARD_TRAINER_IDENTITY=run)',
                False)
    if policy_installed:
        return (NAMESPACE_IDENTITY, f'trainer identity: one ServiceAccount per namespace, each token limited to its '
                f'own run by the ValidatingAdmissionPolicy {TRAINER_POLICY}', False)
    if choice == NAMESPACE_IDENTITY:
        return (NAMESPACE_IDENTITY, f'trainer identity: one ServiceAccount per namespace as configured, but the '
                f'ValidatingAdmissionPolicy {TRAINER_POLICY} or its binding is not installed (or not readable): '
                'any trainer can patch any run in its namespace until it is', True)
    return (RUN_IDENTITY, f'trainer identity: a ServiceAccount and Role per run (the ValidatingAdmissionPolicy '
            f'{TRAINER_POLICY} and its binding are not installed: Kubernetes before 1.30, or an install without it)',
            False)
