#!/usr/bin/env bash
# Token stream, end to end: relayd on a free loopback port, fifty `curl | jq | score.py`
# workers, one producer streaming an answer token by token to all of them. Then relayd is
# stopped and every worker's summary is compared with the answer scored without the pipe.
#
#   examples/token-stream/run.sh                               # 50 workers, 50 tokens/s
#   examples/token-stream/run.sh --consumers 12 --stream 0.005 --out DIR
#
# Uses the repo's .venv (PYTHON=... to choose another) for relayd; the producer and the
# workers need only python3, curl and jq.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-$here/../../.venv/bin/python}
[ -x "$python" ] || { echo "$0: no $python; make the venv first (see README.md)" >&2; exit 1; }
n=50
pause=0.02
out=
while [ $# -gt 0 ]; do
    case $1 in
        --consumers) n=$2; shift ;;
        --stream) pause=$2; shift ;;
        --out) out=$2; shift ;;
        *) echo "usage: $0 [--consumers N] [--stream SECONDS] [--out DIR]" >&2; exit 2 ;;
    esac
    shift
done
for tool in curl jq python3; do
    command -v "$tool" >/dev/null || { echo "$0 needs $tool (apt-get install $tool)" >&2; exit 1; }
done
. "$here/../relay.sh"     # relayd on a free port: sets $url
pipe="$url/llm?n=$n"

echo "relayd:   $url"
echo "workers:  curl -sSf '$pipe' | jq -c .delta | ./score.py --worker \$i     (x$n)"
echo "producer: ./producer.py --stream $pause answer.txt | curl -sSf -T - '$pipe'"
echo

# Each pipeline in a subshell, so that `wait` reports any of its commands failing.
for i in $(seq 1 "$n"); do
    (curl -sSf "$pipe" | jq -c .delta | "$here/score.py" --worker "$i" \
        >"$out/worker-$i.txt") &
    pids+=($!)
done
("$here/producer.py" --stream "$pause" "$here/answer.txt" 2>"$out/producer.txt" \
    | curl -sSf -T - "$pipe" >"$out/sender.txt") &
pids+=($!)

wait_all                # every consumer and the producer; sets $failed
[ "$failed" = 0 ] || { echo "a worker or the producer failed; relayd said:" >&2; cat "$out/relayd.err" >&2; exit 1; }

# The same answer scored without relayd, curl or the fleet: what every worker should print.
"$here/producer.py" --stream 0 "$here/answer.txt" 2>/dev/null \
    | jq -c .delta | "$here/score.py" --worker direct >"$out/direct.txt"

for i in $(seq 1 $((n < 3 ? n : 3))); do
    cat "$out/worker-$i.txt"
done
[ "$n" -le 3 ] || echo "... ($((n - 3)) more in the same shape)"
cat "$out/producer.txt"
echo
echo "distinct summaries across the $n workers:"
for i in $(seq 1 "$n"); do cut -d: -f2- "$out/worker-$i.txt"; done | sort | uniq -c
echo "the answer scored directly, without the pipe:"
echo "      $(cut -d: -f2- "$out/direct.txt")"
expected=$(cut -d: -f2- "$out/direct.txt")
same=$(for i in $(seq 1 "$n"); do cut -d: -f2- "$out/worker-$i.txt"; done | grep -cxF -- "$expected" || true)
echo
echo "the pipe: the answer was generated once and tasted $n times; $same of $n workers match" \
     "the direct computation"
[ "$same" = "$n" ] || exit 1
