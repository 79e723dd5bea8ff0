"""kvwire server side: storage backends, worker, REST and gRPC APIs."""
