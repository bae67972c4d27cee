"""Several processes: data parallelism (``distributed``) and sharded data parallelism (``sharding``)."""
