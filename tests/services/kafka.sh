#!/usr/bin/env bash
# Apache Kafka for the tests: a single-node KRaft broker (combined broker + controller) on 127.0.0.1:9092.
#   tests/services/kafka.sh [start]   install if missing, then start unless something answers on the port
#   tests/services/kafka.sh stop      stop the broker this script started with the same KAFKA_DIR (data is kept)
#   tests/services/kafka.sh restart   stop, then start on the same data (topics and offsets survive)
#   tests/services/kafka.sh install   only install the jars
# Idempotent. The jars come from Maven Central (org.apache.kafka:kafka_2.13 and its runtime dependencies, resolved
# by `mvn dependency:copy-dependencies` from a generated pom) into ~/.cache/wallaroo-connectors/kafka-<version>/libs,
# once per version; Java 17 and Maven come from Debian when missing.
#
# Environment (the defaults are the shared test broker; the tests start private brokers with other values):
#   KAFKA_VERSION          Apache Kafka version (default 4.1.1)
#   KAFKA_PORT             client listener (default 9092)
#   KAFKA_ADVERTISED_PORT  port advertised to clients, e.g. a proxy in front of the broker (default KAFKA_PORT)
#   KAFKA_CONTROLLER_PORT  KRaft controller listener (default KAFKA_PORT + 1)
#   KAFKA_INTERNAL_PORT    inter-broker listener, never proxied (default KAFKA_PORT + 2)
#   KAFKA_DIR              config, data, log and pid file (default /tmp/wallaroo-kafka-<KAFKA_PORT>)
#   KAFKA_HEAP             JVM heap (default 512m)
set -euo pipefail
. "$(dirname "$0")/lib/apt.sh"

VERSION="${KAFKA_VERSION:-4.1.1}"
PORT="${KAFKA_PORT:-9092}"
ADVERTISED="${KAFKA_ADVERTISED_PORT:-$PORT}"
CONTROLLER="${KAFKA_CONTROLLER_PORT:-$((PORT + 1))}"
INTERNAL="${KAFKA_INTERNAL_PORT:-$((PORT + 2))}"
DIR="${KAFKA_DIR:-/tmp/wallaroo-kafka-$PORT}"
HEAP="${KAFKA_HEAP:-512m}"
CACHE="${WALLAROO_CACHE:-$HOME/.cache/wallaroo-connectors}"
HOME_V="$CACHE/kafka-$VERSION"
LIBS="$HOME_V/libs"
LOG4J_VERSION=2.24.3  # the log4j 2 line Kafka 4.1 is built against (log4j-api/core come from its pom)

answers() { (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; }

install() {
  [ -f "$LIBS/.complete" ] && return 0
  command -v java >/dev/null || apt_install openjdk-17-jre-headless
  command -v mvn >/dev/null || apt_install maven
  mkdir -p "$HOME_V"
  # Tests start several brokers at once: one installs, the others wait for it.
  exec 9>"$HOME_V/.lock"
  flock 9
  if [ ! -f "$LIBS/.complete" ]; then
    echo "kafka: resolving Apache Kafka $VERSION from Maven Central into $LIBS"
    cat >"$HOME_V/pom.xml" <<POM
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.wallaroo</groupId>
  <artifactId>kafka-broker-libs</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <!-- kafka.Kafka (the server) and kafka.tools.StorageTool (the formatter) with their runtime dependencies. -->
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId><version>$VERSION</version></dependency>
    <!-- slf4j 1.7 (Kafka's logging API) to log4j 2 (its configuration format), as in the Kafka distribution. -->
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j-impl</artifactId><version>$LOG4J_VERSION</version></dependency>
  </dependencies>
</project>
POM
    rm -rf "$LIBS.tmp"
    (cd "$HOME_V" && mvn -B -q -Dstyle.color=never -Dmaven.repo.local="$CACHE/m2" dependency:copy-dependencies \
      -DincludeScope=runtime -DoutputDirectory="$LIBS.tmp")
    rm -rf "$LIBS"
    mv "$LIBS.tmp" "$LIBS"
    touch "$LIBS/.complete"
  fi
  flock -u 9
}

pid_of() { [ -f "$DIR/kafka.pid" ] && cat "$DIR/kafka.pid"; }

stop() {
  local pid
  pid=$(pid_of) || return 0
  if kill -0 "$pid" 2>/dev/null && grep -q kafka.Kafka "/proc/$pid/cmdline" 2>/dev/null; then
    kill -TERM "$pid"
    # A controlled shutdown takes a few seconds; a broker that hangs in it is killed.
    for _ in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    echo "kafka: stopped the broker on 127.0.0.1:$PORT (pid $pid)"
  fi
  rm -f "$DIR/kafka.pid"
}

start() {
  if answers; then
    echo "kafka: something already listens on 127.0.0.1:$PORT; leaving it running"
    return 0
  fi
  install
  mkdir -p "$DIR"
  cat >"$DIR/server.properties" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$CONTROLLER
controller.listener.names=CONTROLLER
listeners=PLAINTEXT://127.0.0.1:$PORT,INTERNAL://127.0.0.1:$INTERNAL,CONTROLLER://127.0.0.1:$CONTROLLER
advertised.listeners=PLAINTEXT://127.0.0.1:$ADVERTISED,INTERNAL://127.0.0.1:$INTERNAL
# The broker talks to itself (transaction markers) on a listener of its own, so cutting a proxy in front of the
# client listener is an outage for clients only.
inter.broker.listener.name=INTERNAL
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,INTERNAL:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=$DIR/data
num.partitions=1
auto.create.topics.enable=true
# One node: every internal topic has one replica, and few partitions so their creation on first use is quick.
offsets.topic.replication.factor=1
offsets.topic.num.partitions=5
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=5
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
# The log cleaner allocates its dedupe buffer (128 MiB by default) at start-up: with the small test heaps (256 MiB
# for private brokers) that was an intermittent OutOfMemoryError. The test topics need a few MiB at most.
log.cleaner.dedupe.buffer.size=8388608
PROPS
  cat >"$DIR/log4j2.properties" <<'LOG'
appender.out.type=Console
appender.out.name=out
appender.out.layout.type=PatternLayout
appender.out.layout.pattern=[%d] %p %m (%c)%n
rootLogger.level=INFO
rootLogger.appenderRef.out.ref=out
LOG
  local java=(java "-Xms128m" "-Xmx$HEAP" "-Dlog4j2.configurationFile=$DIR/log4j2.properties" -cp "$LIBS/*")
  if [ ! -f "$DIR/data/meta.properties" ]; then
    local id
    id=$("${java[@]}" kafka.tools.StorageTool random-uuid)
    "${java[@]}" kafka.tools.StorageTool format -t "$id" -c "$DIR/server.properties" >"$DIR/format.log" 2>&1 || {
      cat "$DIR/format.log" >&2; return 1; }
  fi
  echo "kafka: starting Apache Kafka $VERSION on 127.0.0.1:$PORT (log: $DIR/kafka.log)"
  # A fresh log per start: readiness is read from it. The previous run's stays beside it.
  [ -f "$DIR/kafka.log" ] && mv "$DIR/kafka.log" "$DIR/kafka.log.1"
  nohup "${java[@]}" kafka.Kafka "$DIR/server.properties" >"$DIR/kafka.log" 2>&1 </dev/null &
  local pid=$!
  echo "$pid" >"$DIR/kafka.pid"
  # Ready when the broker says so (listener open and metadata published), not merely when the port opens.
  for _ in $(seq 1 1200); do
    if answers && grep -q "Kafka Server started" "$DIR/kafka.log"; then
      echo "kafka: broker (pid $pid) ready on 127.0.0.1:$PORT"
      return 0
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "kafka: the broker exited during start-up; last lines of $DIR/kafka.log:" >&2
      tail -n 30 "$DIR/kafka.log" >&2 || true
      return 1
    fi
    sleep 0.1
  done
  echo "kafka: the broker did not become ready within 120 s; last lines of $DIR/kafka.log:" >&2
  tail -n 30 "$DIR/kafka.log" >&2 || true
  return 1
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  restart) stop; start ;;
  install) install ;;
  *) echo "usage: $0 [start|stop|restart|install]" >&2; exit 2 ;;
esac
