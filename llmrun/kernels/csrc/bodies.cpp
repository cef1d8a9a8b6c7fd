// The table of loaded kernel bodies (bodies.h) and the op that fills it.
#include <dlfcn.h>

#include <string>

#include "bodies.h"
#include "ops.h"

namespace llmrun_kernels {

static Bodies g_bodies[BODY_SETS];
static const char* const kEntries[BODY_SETS] = {"llmrun_bodies_avx512", "llmrun_bodies_avxvnni",
                                                "llmrun_bodies_avxvnni_evex", "llmrun_bodies_avx2"};

const Bodies& bodies(int set) { return g_bodies[set]; }

// Fills set's bodies from the shared object at path (kept loaded for the process's life).
void load_bodies(const std::string& path, int64_t set) {
  TORCH_CHECK(set >= 0 && set < BODY_SETS, "load_bodies: no body set ", set);
  void* lib = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  TORCH_CHECK(lib != nullptr, "load_bodies: cannot load ", path, ": ", dlerror());
  auto entry = reinterpret_cast<void (*)(Bodies*)>(dlsym(lib, kEntries[set]));
  TORCH_CHECK(entry != nullptr, "load_bodies: ", path, " has no ", kEntries[set]);
  Bodies b;
  entry(&b);
  g_bodies[set] = b;
}

}  // namespace llmrun_kernels
