// Simulator stand-in for <cuda_runtime.h>: the simulated machine and runtime.
#pragma once
#include "cuda_sim.h"
#include "cuda_sim_runtime.h"
