#!/usr/bin/env bash
# `make kind-demo`: trainguard on a local kind cluster (needs Docker, kind, kubectl, helm).
set -euo pipefail
cd "$(dirname "$0")/.."
CLUSTER=${CLUSTER:-trainguard-demo}
for tool in docker kind kubectl helm; do
  command -v "$tool" >/dev/null || { echo "kind-demo needs $tool on PATH" >&2; exit 2; }
done
kind get clusters | grep -qx "$CLUSTER" || kind create cluster --name "$CLUSTER"
docker build -f operator/Dockerfile -t trainguard/operator:demo .
docker build -t trainguard/trainer:demo trainer-image
kind load docker-image --name "$CLUSTER" trainguard/operator:demo trainguard/trainer:demo
helm upgrade --install trainguard charts/trainguard -n trainguard-system --create-namespace --wait \
  --set image.repository=trainguard/operator --set image.tag=demo --set image.pullPolicy=Never \
  --set operator.trainerImage.repository=trainguard/trainer --set operator.trainerImage.tag=demo \
  --set operator.trainerImage.pullPolicy=Never
kubectl apply -f manifests/samples/cpu-run.yaml -f manifests/samples/hang-demo-run.yaml
echo "Watching runs (Ctrl-C to stop; 'kind delete cluster --name $CLUSTER' to clean up):"
kubectl get tr -w
