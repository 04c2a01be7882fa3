"""The runtime: resolve sites in real models, attach compiled units, and the Adapter handle over them."""
