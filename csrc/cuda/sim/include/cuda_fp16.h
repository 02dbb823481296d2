// Simulator stand-in for the CUDA header of this name (see ../half_types.h).
#pragma once
#include "../half_types.h"
