"""The Open Inference Protocol (KServe v2): the codec shared by REST and gRPC, the gRPC server, and the
protocol's .proto with its generated stubs (`make proto`)."""
