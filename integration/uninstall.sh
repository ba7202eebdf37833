#!/usr/bin/env bash
# Removes poolkeeper from the cluster of the current kubectl context without blocking pods on
# the way; safe to run again (and when poolkeeper is already broken or half removed). `make
# uninstall` runs it.
#
#   integration/uninstall.sh [KUSTOMIZATION]      default: deploy; the one it was installed from
#
# Environment:
#   KUBECTL                 default: kubectl
#   WAIT_SECONDS=120        how long step 2 may take before giving up (nothing else is deleted)
#   SETTLE_SECONDS=5        extra wait after step 2, for the other API servers of an HA control
#                           plane (the probe reaches one of them)
#   NAMESPACE_LABEL_KEY     the pool label of namespaces (default agentpool), and
#   NODE_LABEL_KEY          the nodeSelector key poolkeeper sets (default agentpool): the rule's
#                           namespaceLabelKey and nodeLabelKey
#
# Steps:
#   1. The ValidatingAdmissionPolicyBinding and the policy (the backstop would deny the pods the
#      webhook no longer pins), then the MutatingWebhookConfiguration: the API server stops
#      calling poolkeeper (placement fails closed) before its pods go.
#   2. Wait until the API server no longer applies them: a dry-run pod created in a pooled
#      namespace is admitted and not pinned (no webhook, no policy). Without a pooled namespace
#      there is nothing to probe, so only SETTLE_SECONDS.
#   3. Everything else: `kubectl delete -k KUSTOMIZATION` (the namespace, with the Secret
#      poolkeeper-tls that deploy.sh or cert-manager wrote, and anything deploy/monitoring put
#      there; the ClusterRole and its binding). Kinds the API server does not serve (a removed
#      cert-manager's Certificate) have no objects left to delete and are skipped.
# Pods already running keep their nodeSelector; namespaces keep their labels.
set -euo pipefail
cd "$(dirname "$0")/.."

KUSTOMIZATION=${1:-deploy}
KUBECTL=${KUBECTL:-kubectl}
WAIT_SECONDS=${WAIT_SECONDS:-120}
SETTLE_SECONDS=${SETTLE_SECONDS:-5}
NAMESPACE_LABEL_KEY=${NAMESPACE_LABEL_KEY:-agentpool}
NODE_LABEL_KEY=${NODE_LABEL_KEY:-agentpool}
# The names in deploy/base (tests/test_manifests.py checks them).
WEBHOOK_CONFIGURATION=poolkeeper
POLICY=poolkeeper-pod-placement
EXCLUDED=poolkeeper-system,kube-system,kube-public,kube-node-lease  # never pinned, never probed

say() { echo "uninstall.sh: $*" >&2; }
kc() { "$KUBECTL" "$@"; }

command -v "$KUBECTL" >/dev/null || { say "$KUBECTL not found"; exit 2; }
[[ -e $KUSTOMIZATION/kustomization.yaml ]] || { say "$KUSTOMIZATION is not a kustomization"; exit 2; }
say "context $(kc config current-context), kustomization $KUSTOMIZATION"

# 1. The admission objects, backstop first. A kind this API server does not serve (no
# ValidatingAdmissionPolicy before 1.30 and the no-admission-policy overlay) has none.
group=admissionregistration.k8s.io
served=$(kc api-resources --api-group="$group" -o name)
for resource in "validatingadmissionpolicybindings/$POLICY" "validatingadmissionpolicies/$POLICY" \
                "mutatingwebhookconfigurations/$WEBHOOK_CONFIGURATION"; do
  if grep -qx "${resource%%/*}.$group" <<<"$served"; then
    kc delete "${resource%%/*}.$group/${resource#*/}" --ignore-not-found --wait=true >&2
  fi
done

# 2. Until the API server admits an unpinned pod in a pooled namespace.
namespace=$(kc get namespaces -l "$NAMESPACE_LABEL_KEY,kubernetes.io/metadata.name notin ($EXCLUDED)" \
  -o 'jsonpath={range .items[*]}{.metadata.name}{"\n"}{end}' | head -n1)
if [[ -n $namespace ]]; then
  probe='{"apiVersion": "v1", "kind": "Pod",
          "metadata": {"generateName": "poolkeeper-uninstall-probe-"},
          "spec": {"containers": [{"name": "probe", "image": "registry.k8s.io/pause:3.10"}]}}'
  deadline=$((SECONDS + WAIT_SECONDS))
  say "waiting until a pod in namespace $namespace is admitted unpinned (dry run)"
  while true; do
    if selector=$(kc -n "$namespace" create --dry-run=server -o 'jsonpath={.spec.nodeSelector}' \
                    -f - <<<"$probe" 2>&1) && [[ $selector != *"\"$NODE_LABEL_KEY\""* ]]; then
      break
    fi
    if ((SECONDS >= deadline)); then
      say "after ${WAIT_SECONDS}s the API server still applies poolkeeper's webhook or policy" \
          "in $namespace (last answer: ${selector:-admitted, pinned}); nothing else was deleted." \
          "Check for a re-applied webhook configuration and run this again."
      exit 1
    fi
    sleep 1
  done
else
  say "no namespace labelled $NAMESPACE_LABEL_KEY to probe"
fi
sleep "$SETTLE_SECONDS"

# 3. The rest. kubectl fails on kinds this API server does not serve (it says "resource mapping
# not found ... ensure CRDs are installed first"): no object of such a kind exists to delete.
errors=$(mktemp)
trap 'rm -f "$errors"' EXIT
if ! kc delete -k "$KUSTOMIZATION" --ignore-not-found --wait=true >&2 2>"$errors"; then
  if grep -v -e 'resource mapping not found for name' -e '^ensure CRDs are installed first' \
       -e '^Warning: ' "$errors" >&2; then
    say "kubectl delete -k $KUSTOMIZATION failed (above); run this again once it is fixed"
    exit 1
  fi
  say "skipped kinds this API server does not serve: $(grep -o 'no matches for kind "[^"]*"' \
    "$errors" | cut -d'"' -f2 | sort -u | paste -sd, -)"
fi
say "done: poolkeeper's objects are gone; pods in pooled namespaces are created unpinned"
