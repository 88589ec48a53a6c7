// Simulator stand-in for <cooperative_groups.h>: thread-block clusters
// (this_cluster: sync, map_shared_rank, block_rank, num_blocks), see cuda_sim.h.
#pragma once
#include "cuda_sim.h"

namespace cooperative_groups {

class cluster_group {
 public:
  // A barrier of every thread of every block of the cluster (shared-memory
  // writes before it are visible to the whole cluster after it).
  void sync() const { cuda_sim::cluster_sync(); }
  // The address of *p in the shared memory of the cluster's block `rank`.
  template <typename T>
  T* map_shared_rank(T* p, unsigned rank) const {
    return static_cast<T*>(cuda_sim::map_shared_rank(p, sizeof(T), rank));
  }
  unsigned block_rank() const { return cuda_sim::cluster_rank(); }
  unsigned num_blocks() const { return cuda_sim::cluster_size(); }
};

inline cluster_group this_cluster() { return {}; }

}  // namespace cooperative_groups
