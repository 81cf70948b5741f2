"""``nodeagent run --workers N``: connections served by N processes.

The main process (worker 0) keeps what is not per connection (config, CA client and
certificate store, capture, the node agent socket, hand-over, the metrics listener) and
serves connections too; each further worker is a process of its own (``child``) that
the main process starts and restarts (``pool``), talking to it over a UNIX socketpair
(``wire``): it gets each pod's listening sockets (a second socket per port of the same
``SO_REUSEPORT`` group, opened by the main process in the pod's netns), the config
snapshot and the certificates, and answers for its connections, metrics, RSS and CPU.
"""
