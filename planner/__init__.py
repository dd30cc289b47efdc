"""The planner: profile the engine, fit latency models, simulate the runtime's own scheduler
and router code, search parallelism / instance counts / placement / codec level per pool
under TTFT/TPOT SLOs, and write a cluster config that `splitserve run` executes as is.

    profile.json --fit--> LatencyModel (per TP) --+
    model config + GPU specs --roofline----------+--> Simulator (engine.scheduler, cluster.router)
    link speed + codec rates --> TransferModel ---+          |
                                                   search: prune analytically, bisect rate in
                                                   simulation, re-simulate the best few -> plan YAML
"""
