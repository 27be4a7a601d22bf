// A scoped cache of CPU tensor memory (allocation_cache.cpp says why and how): between enter()
// and the matching exit(), freed CPU tensor blocks are kept in exact-size free lists and reused.
#pragma once

namespace pyfastbayes::cpu {

void allocation_cache_enter();
void allocation_cache_exit();
bool allocation_cache_active();  // inside a scope, and the process's CPU allocator is the cache

}  // namespace pyfastbayes::cpu
