// Simulator stand-in for <cuda_runtime.h>: the simulated runtime (cuda_sim.h).
#pragma once
#include "cuda_sim.h"
