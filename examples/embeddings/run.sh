#!/usr/bin/env bash
# Fleet embeddings, end to end: relayd on a free loopback port, eight consumers that each
# rank the catalog against their own item, one producer that embeds the catalog once and
# pipes the vectors to all eight. Then relayd is stopped.
#
#   examples/embeddings/run.sh              # about 6 s on 2 cores
#   examples/embeddings/run.sh --baseline   # then embed the catalog 8 times without the pipe
#   examples/embeddings/run.sh --out DIR    # keep every process's output in DIR
#
# Uses the repo's .venv (PYTHON=... to choose another) for relayd and the producer; the
# consumers need only curl and python3's standard library.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-$here/../../.venv/bin/python}
[ -x "$python" ] || { echo "$0: no $python; make the venv first (see README.md)" >&2; exit 1; }
n=8
# Each consumer's query: "more like this item". One per department, so the fleet's
# answers differ while the vectors they score with are the same.
queries=(sku-0001 sku-0032 sku-0051 sku-0088 sku-0101 sku-0132 sku-0176 sku-0226)

baseline=no
out=
while [ $# -gt 0 ]; do
    case $1 in
        --baseline) baseline=yes ;;
        --out) out=$2; shift ;;
        *) echo "usage: $0 [--baseline] [--out DIR]" >&2; exit 2 ;;
    esac
    shift
done
for tool in curl python3; do
    command -v "$tool" >/dev/null || { echo "$0 needs $tool (apt-get install $tool)" >&2; exit 1; }
done
. "$here/../relay.sh"     # relayd on a free port: sets $url
pipe="$url/embeddings?n=$n"

echo "relayd:    $url"
echo "consumers: curl -sSf '$pipe' | ./consumer.py --like ID     (x$n)"
echo "producer:  python producer.py catalog.tsv | curl -sSf -T - '$pipe'"
echo

# Each pipeline in a subshell, so that `wait` reports any of its commands failing.
for i in $(seq 1 $n); do
    (curl -sSf "$pipe" \
        | "$here/consumer.py" --like "${queries[$((i - 1))]}" --name "consumer $i" \
        >"$out/consumer-$i.txt") &
    pids+=($!)
done
("$python" "$here/producer.py" "$here/catalog.tsv" 2>"$out/producer.txt" \
    | curl -sSf -T - "$pipe" >"$out/sender.txt") &
pids+=($!)

wait_all                # every consumer and the producer; sets $failed
for i in $(seq 1 $n); do
    cat "$out/consumer-$i.txt"
    echo
done
cat "$out/producer.txt"
[ "$failed" = 0 ] || { echo "a consumer or the producer failed; relayd said:" >&2; cat "$out/relayd.err" >&2; exit 1; }

# Every consumer printed the sha256 of the vectors it scored with; the producer printed
# the sha256 of the vectors it computed.
produced=$(grep -o 'sha256 [0-9a-f]*' "$out/producer.txt")
same=$(cat "$out"/consumer-*.txt | grep -c "$produced" || true)
echo
echo "the pipe: one embedding pass served $n consumers; $same of $n consumers' vectors are" \
     "bit-identical to the producer's"
[ "$same" = "$n" ] || exit 1

if [ "$baseline" = yes ]; then
    echo
    "$python" "$here/baseline.py" --passes "$n" --catalog "$here/catalog.tsv"
else
    echo "(run.sh --baseline then embeds the catalog $n times without the pipe, to compare)"
fi
