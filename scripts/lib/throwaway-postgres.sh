# A throwaway Postgres from the system's binaries (installed from Debian's
# packages when missing and run as root), on a free local port in a temp dir.
# Sourced by scripts/test and scripts/bench-postgres; the caller traps
# stop_postgres.

pg_bindir() {
  local dir
  dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  if [ -z "$dir" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "throwaway-postgres: installing PostgreSQL from Debian's packages" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >&2
    dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  fi
  [ -n "$dir" ] || { echo "throwaway-postgres: no PostgreSQL binaries under /usr/lib/postgresql" >&2; return 1; }
  echo "$dir"
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# start_postgres [fsync=on|off]: sets postgres_url to a new database "quotad_test".
start_postgres() {
  local bin port fsync=${1:-fsync=on}
  bin=$(pg_bindir)
  pg_dir=$(mktemp -d)
  port=$(free_port)
  # initdb refuses to run as root: run the server as the postgres user then.
  local as=()
  if [ "$(id -u)" = 0 ]; then
    chown postgres "$pg_dir"
    as=(runuser -u postgres --)
  fi
  "${as[@]}" "$bin/initdb" -D "$pg_dir/data" -U postgres --auth=trust -E UTF8 >"$pg_dir/initdb.log" 2>&1 ||
    { cat "$pg_dir/initdb.log" >&2; return 1; }
  "${as[@]}" "$bin/pg_ctl" -D "$pg_dir/data" -l "$pg_dir/server.log" -w -t 60 \
    -o "-p $port -k $pg_dir -c listen_addresses=127.0.0.1 -c $fsync" start >/dev/null ||
    { cat "$pg_dir/server.log" >&2; return 1; }
  pg_stop=("${as[@]}" "$bin/pg_ctl" -D "$pg_dir/data" -m immediate stop)
  "$bin/createdb" -h 127.0.0.1 -p "$port" -U postgres quotad_test
  postgres_url="postgres://postgres@127.0.0.1:$port/quotad_test"
  echo "throwaway-postgres: throwaway Postgres on 127.0.0.1:$port" >&2
}

stop_postgres() {
  if [ -n "${pg_dir:-}" ]; then
    "${pg_stop[@]}" >/dev/null 2>&1 || true
    rm -rf "$pg_dir"
  fi
}

