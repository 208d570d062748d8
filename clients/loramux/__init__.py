"""Generated gRPC stubs of the loramux API (protos/loramux/). Written by `make proto`; never edit by hand."""
