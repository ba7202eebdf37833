#!/usr/bin/env bash
# Installs or upgrades poolkeeper in the cluster of the current kubectl context; run again at any
# time (it is idempotent). `make kind-deploy` runs it.
#
#   integration/deploy.sh [KUSTOMIZATION]      default: deploy (the base); e.g. deploy/overlays/kind
#
# Two ways to the certificates (README "Deploying to a cluster"), told apart by the rendered
# Deployment (POOLKEEPER_MANAGE_CERTS):
# - managed (the base, kind): poolkeeper creates and renews the Secret poolkeeper-tls and keeps
#   the caBundle itself. This script applies the workload and waits for the rollout (ready pods
#   serve the Secret's pair); creates the webhook configuration, when there is none, with the
#   Secret's CA as caBundle (`kubectl create`: kubectl keeps no record of the caBundle, so no
#   later apply removes it); drops the caBundle from kubectl's record of the configuration
#   (`kubectl apply set-last-applied`: an install made by this script before recorded it, and
#   the next apply would remove it); then applies the admission objects.
# - external (deploy/overlays/external-certs): this script makes and rotates the certificate,
#   as below, and renews it when it is within 30 days of expiry, without downtime.
#
# Environment:
#   IMAGE=REF     run this image instead of the manifests' poolkeeper image
#   ROTATE=1      replace the certificate now, even if it is still good (managed: by deleting
#                 the Secret, which poolkeeper makes again with a new CA)
#   PYTHON        a Python with poolkeeper installed (default: $VENV/bin/python, VENV as in the
#                 Makefile: .venv unless set, as in the dev container)
#   KUBECTL       default: kubectl
#
# Steps (external):
#   1. The namespace, then the current pair from Secret poolkeeper-tls (if any). `poolkeeper
#      certs` keeps it when it is good, else makes a new CA and pair (ROTATE=1: always).
#   2. Fresh install: the Secret, the workload, wait for the rollout, then the webhook
#      configuration (caBundle = the CA) and the ValidatingAdmissionPolicy. A webhook
#      configuration applied before its pods are ready would fail pod creation in pooled
#      namespaces; the policy without the webhook would deny every pod that does not pin itself.
#   3. Rotation (a new CA): the webhook configuration first trusts the old and the new CA; then
#      the Secret gets the new pair and the Deployment rolls (maxUnavailable 0, PDB): every pod
#      serves the new pair; then the caBundle drops the old CA. No review fails at any point.
#   4. Kept pair: the manifests are applied as they are now (an upgrade), caBundle unchanged.
# Without cert-manager only; with it, use `kubectl apply -k deploy/overlays/cert-manager`. Run on
# a kustomization whose Deployment manages its certificates it takes the managed path above.
set -euo pipefail
cd "$(dirname "$0")/.."

KUSTOMIZATION=${1:-deploy}
NAMESPACE=poolkeeper-system
SERVICE=poolkeeper
SECRET=poolkeeper-tls
DEPLOYMENT=poolkeeper
WEBHOOK_CONFIGURATION=poolkeeper
KUBECTL=${KUBECTL:-kubectl}
PYTHON=${PYTHON:-${VENV:-.venv}/bin/python}
ROLLOUT_TIMEOUT=${ROLLOUT_TIMEOUT:-180s}
# The API servers pick a changed webhook configuration up from their watch within about a
# second; nothing outside them shows when, so the rotation waits this long for it.
WEBHOOK_PROPAGATION_SECONDS=${WEBHOOK_PROPAGATION_SECONDS:-5}

say() { echo "deploy.sh: $*" >&2; }
kc() { "$KUBECTL" "$@"; }

command -v "$KUBECTL" >/dev/null || { say "$KUBECTL not found"; exit 2; }
"$PYTHON" -c 'import app' 2>/dev/null || { say "$PYTHON cannot import poolkeeper: run make venv"; exit 2; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/current" "$work/next"

render() {  # render PART CA_FILE... -> stdout
  local part=$1; shift
  local args=(--part "$part")
  for ca in "$@"; do args+=(--ca-file "$ca"); done
  [[ -n ${IMAGE:-} ]] && args+=(--image "poolkeeper=$IMAGE")
  "$PYTHON" integration/manifests.py "$KUSTOMIZATION" "${args[@]}"
}

apply_workload() {
  render workload "$@" | kc apply -f -
  kc -n "$NAMESPACE" rollout status "deployment/$DEPLOYMENT" --timeout "$ROLLOUT_TIMEOUT"
}

apply_admission() { render admission "$@" | kc apply -f -; }

store_secret() {  # store_secret DIR
  kc -n "$NAMESPACE" create secret generic "$SECRET" --type kubernetes.io/tls \
    --from-file "tls.crt=$1/tls.crt" --from-file "tls.key=$1/tls.key" \
    --from-file "ca.crt=$1/ca.crt" --dry-run=client -o yaml \
    | kc label --local -f - app.kubernetes.io/name=poolkeeper -o yaml \
    | kc apply -f -
}

say "context $(kc config current-context), kustomization $KUSTOMIZATION"
kc get namespace "$NAMESPACE" >/dev/null 2>&1 || kc create namespace "$NAMESPACE"

if [[ $("$PYTHON" integration/manifests.py "$KUSTOMIZATION" --certificates) == managed ]]; then
  say "poolkeeper manages its certificates (Secret $SECRET) and the caBundle"
  apply_workload
  if ! kc get mutatingwebhookconfiguration "$WEBHOOK_CONFIGURATION" >/dev/null 2>&1; then
    kc -n "$NAMESPACE" get secret "$SECRET" -o 'jsonpath={.data.ca\.crt}' | base64 -d \
      >"$work/current/ca.crt"
    render webhooks "$work/current/ca.crt" | kc create -f -
  fi
  render webhooks | kc apply set-last-applied --create-annotation -f -
  apply_admission
  if [[ ${ROTATE:-} == 1 ]]; then  # a new CA now: poolkeeper makes one, trusting the old meanwhile
    old=$(kc -n "$NAMESPACE" get secret "$SECRET" -o 'jsonpath={.data.ca\.crt}')
    kc -n "$NAMESPACE" delete secret "$SECRET"
    for _ in $(seq 120); do
      new=$(kc -n "$NAMESPACE" get secret "$SECRET" -o 'jsonpath={.data.ca\.crt}' 2>/dev/null) \
        && [[ -n $new && $new != "$old" ]] && break
      sleep 0.5
    done
    if [[ -z ${new:-} || $new == "$old" ]]; then
      say "poolkeeper did not make a new Secret in 60s: see make logs"; exit 1
    fi
    say "rotated: a new CA in Secret $SECRET; the old one stays trusted for the overlap"
  fi
  say "done: $(kc -n "$NAMESPACE" get deployment "$DEPLOYMENT" \
    -o jsonpath='{.status.readyReplicas}/{.spec.replicas}') replicas ready"
  exit 0
fi

have_current=false
if kc -n "$NAMESPACE" get secret "$SECRET" >/dev/null 2>&1; then
  have_current=true
  for key in ca.crt tls.crt tls.key; do
    kc -n "$NAMESPACE" get secret "$SECRET" -o "jsonpath={.data.${key//./\\.}}" \
      | base64 -d >"$work/current/$key"
    cp "$work/current/$key" "$work/next/$key"
  done
fi
force=()
[[ ${ROTATE:-} == 1 ]] && force=(--force)
"$PYTHON" -m app certs --out "$work/next" --service "$SERVICE" --namespace "$NAMESPACE" \
  "${force[@]}" >/dev/null

if ! $have_current; then
  say "installing with a new certificate"
  store_secret "$work/next"
  apply_workload "$work/next/ca.crt"
  apply_admission "$work/next/ca.crt"
elif cmp -s "$work/current/ca.crt" "$work/next/ca.crt"; then
  say "certificate kept; applying the manifests"
  apply_workload "$work/current/ca.crt"
  apply_admission "$work/current/ca.crt"
else
  say "rotating the certificate"
  apply_admission "$work/current/ca.crt" "$work/next/ca.crt"
  sleep "$WEBHOOK_PROPAGATION_SECONDS"
  store_secret "$work/next"
  apply_workload "$work/current/ca.crt" "$work/next/ca.crt"
  kc -n "$NAMESPACE" rollout restart "deployment/$DEPLOYMENT"
  kc -n "$NAMESPACE" rollout status "deployment/$DEPLOYMENT" --timeout "$ROLLOUT_TIMEOUT"
  apply_admission "$work/next/ca.crt"
fi
say "done: $(kc -n "$NAMESPACE" get deployment "$DEPLOYMENT" \
  -o jsonpath='{.status.readyReplicas}/{.spec.replicas}') replicas ready"
