# Sourced by each example's run.sh: relayd on a free loopback port, stopped (by its PID) when
# the script exits. Expects $python and $out (empty: a temporary directory, removed after);
# sets $url and $relayd_pid. The script sets relayd_stop=TERM once the transfer is over, for
# a graceful stop (until then QUIT: an interrupted run ends every curl with it).
if [ -z "$out" ]; then
    out=$(mktemp -d)
    keep_out=no
else
    mkdir -p "$out"
    keep_out=yes
fi

relayd_pid=
relayd_stop=QUIT   # until the transfer is over: stop at once, ending every curl with it
pids=()
cleanup() {
    if [ -n "$relayd_pid" ]; then
        kill -"$relayd_stop" "$relayd_pid" 2>/dev/null || true
        wait "$relayd_pid" 2>/dev/null || true
    fi
    [ "$keep_out" = yes ] || rm -rf "$out"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# relayd: port 0 picks a free port; the first line it prints says which.
"$python" -m relayd --host 127.0.0.1 --port 0 >"$out/relayd.out" 2>"$out/relayd.err" &
relayd_pid=$!
url=
for _ in $(seq 300); do
    url=$(grep -om1 'http://127\.0\.0\.1:[0-9]*' "$out/relayd.out" || true)
    [ -n "$url" ] && break
    kill -0 "$relayd_pid" 2>/dev/null || { cat "$out/relayd.err" >&2; exit 1; }
    sleep 0.1
done
[ -n "$url" ] || { echo "relayd did not start in 30 s" >&2; exit 1; }

# Wait for every process in $pids -- with `wait`, not a foreground pipeline, so that a signal
# ends the run at once -- and set $failed. The transfer is over: relayd may stop gracefully.
wait_all() {
    failed=0
    for pid in "${pids[@]}"; do
        wait "$pid" || failed=1
    done
    relayd_stop=TERM
}
