#!/usr/bin/env bash
# buf breaking: the contract must stay wire- and JSON-compatible with the last
# committed version (HEAD when proto/ has uncommitted changes, else HEAD~1).
set -euo pipefail
cd "$(dirname "$0")/.."
against=HEAD
git diff --quiet HEAD -- proto/ 2>/dev/null && against=HEAD~1
if ! git cat-file -e "$against:proto/llmserve/v1/chat.proto" 2>/dev/null; then
  echo "buf breaking: no earlier contract at $against, nothing to compare"
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
git archive "$against" proto | tar -x -C "$tmp"
python proto/generate.py --image-only "$tmp/proto" --out "$tmp/against.binpb"
cd proto
buf breaking ../build/proto/llmserve.binpb --against "$tmp/against.binpb" \
  --path llmserve/v1/chat.proto --config buf.yaml
echo "buf breaking: compatible with $against"
