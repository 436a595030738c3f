#!/bin/bash
# Cluster-mode figures (benches/README.md): chat-bench fanout, rooms and
# durable against 1 node on sled, 1 node on Redis and 3 nodes on Redis, with
# the nodes' and Redis's CPU. Needs `cargo build --release --workspace`,
# redis-server and bc. Results in $OUT (default /tmp/chatd-cluster-bench).
set -u
cd "$(dirname "$0")/../.."
R=target/release
OUT=${OUT:-/tmp/chatd-cluster-bench}; rm -rf $OUT; mkdir -p $OUT
BASE=/var/tmp/cbench; rm -rf $BASE; mkdir -p $BASE
cpu() { awk '{print $14+$15}' /proc/$1/stat; }   # utime+stime in ticks
TCK=$(getconf CLK_TCK)
uptime > $OUT/uptime-start
start_redis() {
  rm -rf $BASE/redis; mkdir -p $BASE/redis
  redis-server --port 6390 --dir $BASE/redis --appendonly yes --appendfsync always --save '' --daemonize no >$OUT/redis.log 2>&1 &
  REDIS=$!; sleep 0.5
}
start_nodes() { # $1 = count, $2.. extra
  local n=$1; shift
  PIDS=(); ADDRS=""
  for i in $(seq 0 $((n-1))); do
    $R/chatd serve --data $BASE/d$i --tcp 127.0.0.1:$((7400+10*i)) --http 127.0.0.1:$((7480+10*i)) --publish-rate 0 --token-secret "0123456789abcdef0123456789abcdef-bench" --log-level warn "$@" >$OUT/node$i.log 2>&1 &
    PIDS+=($!); ADDRS="$ADDRS,127.0.0.1:$((7400+10*i))"
  done
  ADDRS=${ADDRS#,}
  sleep 1.5
}
stop_all() { for p in "${PIDS[@]}"; do kill $p; done; wait "${PIDS[@]}" 2>/dev/null; if [ -n "${REDIS:-}" ]; then kill $REDIS; wait $REDIS 2>/dev/null; REDIS=; fi; sleep 0.5; }
secret() { echo -n "0123456789abcdef0123456789abcdef-bench" > $BASE/secret; }
secret
run() { # name scenario args
  local name=$1; shift
  local before_nodes=0 before_redis=0
  for p in "${PIDS[@]}"; do before_nodes=$((before_nodes + $(cpu $p))); done
  [ -n "${REDIS:-}" ] && before_redis=$(cpu $REDIS)
  local t0=$(date +%s.%N)
  $R/chat-bench --server $ADDRS --secret-file $BASE/secret --duration 10 --warmup 2 --json $OUT/$name.json "$@" > $OUT/$name.txt 2>$OUT/$name.err
  local t1=$(date +%s.%N)
  local after_nodes=0 after_redis=0
  for p in "${PIDS[@]}"; do after_nodes=$((after_nodes + $(cpu $p))); done
  [ -n "${REDIS:-}" ] && after_redis=$(cpu $REDIS)
  echo "$name nodes_cpu_pct=$(echo "scale=0; 100*($after_nodes-$before_nodes)/$TCK/($t1-$t0)" | bc) redis_cpu_pct=$(echo "scale=0; 100*($after_redis-$before_redis)/$TCK/($t1-$t0)" | bc) load=$(cut -d' ' -f1 /proc/loadavg)" >> $OUT/cpu.txt
}
for setup in sled redis1 redis3; do
  for sc in fanout rooms durable; do
    case $setup in
      sled) REDIS=; start_nodes 1 ;;
      redis1) start_redis; start_nodes 1 --cluster redis://127.0.0.1:6390 ;;
      redis3) start_redis; start_nodes 3 --cluster redis://127.0.0.1:6390 ;;
    esac
    case $sc in
      fanout) run $setup-fanout fanout --subscribers 100 --publishers 1 --inflight 64 ;;
      rooms) run $setup-rooms rooms --rooms 1000 --members 10 --publishers 10 --inflight 16 ;;
      durable) run $setup-durable durable --publishers 4 --inflight 128 --rooms 8 ;;
    esac
    stop_all
    rm -rf $BASE/d0 $BASE/d1 $BASE/d2
  done
done
uptime > $OUT/uptime-end
echo done > $OUT/DONE
