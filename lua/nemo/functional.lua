-- lua/nemo/functional.lua: nemo.nn.functional. The op families (lua/nemo/ops/*.lua) fill it;
-- argument order follows PyTorch, keyword arguments come as a final options table.
return {}
