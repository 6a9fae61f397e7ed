// A launch grid, shared by the runtimes (GPU and emulator) and the *_run.h launch code.
#pragma once

namespace attnexport::cuda {

struct Grid {
  unsigned x = 1, y = 1, z = 1;
};

}  // namespace attnexport::cuda
