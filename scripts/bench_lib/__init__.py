"""Helpers of scripts/bench: servers under test, lean clients, workloads, reports.

One module per responsibility:
  deps        installs piping-server (npm), nginx (apt), matplotlib (pip) when missing
  procstats   CPU seconds and RSS of a server's whole process tree (psutil)
  payload     random payload files and their sha256
  lifetime    children get SIGTERM when the harness dies (PR_SET_PDEATHSIG)
  servers     start/stop relayd, piping-server and nginx on 127.0.0.1, by process group
  http_body   incremental HTTP/1.1 response decoder (head, Content-Length, chunked)
  receivers   one process driving many lean GET receivers with selectors (run as a program;
              the harness runs one per usable core), every body byte checked
  pipes       the producers and receivers of many pipes, over the same loop (a program)
  listen_queue  a server's accept-queue fill (sock_diag), so connects never overflow it
  producer    paced chunked "token" producer on a raw socket (run as a program)
  workloads   one measured run of each workload against one server, integrity checked
  stats       median / min / max of repeated runs
  report      the plain-text table and the JSON document
  chart       the PNG chart (imports matplotlib lazily)
"""
