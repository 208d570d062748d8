"""loramux.v1 stubs, generated from protos/loramux/v1/*.proto by `make proto` (grpcio-tools); never edit.

adapter_service_pb2 / _pb2_grpc: AdapterService (LoadAdapter, UnloadAdapter, SetAdapter, GetAdapter,
ListAdapters). generation_service_pb2 / _pb2_grpc: GenerationService (Generate, server streaming).
"""
