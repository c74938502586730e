#!/usr/bin/env python3
# No import cycles between the crate's files (issue 11), nor between its top-level modules (issue 21).
# File-level "uses" graph of src/: an edge A -> B when A's non-test code names an item of module B
# (crate::x::y, super::x, self::x, or `pub use child::...`). Module declarations (`mod x;`) are containment, not uses.
import re,glob,sys
def modpath(f):
    rel=f[4:-3]
    return 'crate' if rel in('lib','main') else 'crate::'+rel.replace('/','::')
files={modpath(f):f for f in glob.glob('src/**/*.rs',recursive=True)}
mods=set(files)
def longest(path):
    parts=path.split('::')
    for n in range(len(parts),0,-1):
        p='::'.join(parts[:n])
        if p in mods: return p
    return None
graph={}
for m,f in files.items():
    if m=='crate': continue
    txt=open(f).read()
    i=txt.find('#[cfg(test)]\nmod tests')
    if i>=0: txt=txt[:i]
    txt=re.sub(r'//.*','',txt)
    deps=set()
    parent=m.rsplit('::',1)[0]
    # expand use trees crudely: take every path-like token
    for tok in re.findall(r'\b(?:crate|super|self)(?:::\{?[\w:]+)+',txt):
        tok=tok.replace('{','')
        if tok.startswith('super::'): tok=parent+tok[5:]
        elif tok.startswith('self::'): tok=m+tok[4:]
        t=longest(tok)
        if t and t!=m and t!='crate': deps.add(t)
    for g in re.findall(r'use crate::\{([^}]*)\}',txt,re.S):
        for p in re.findall(r'(\w+)::',g):
            t=longest('crate::'+p)
            if t and t!=m: deps.add(t)
    for p in re.findall(r'pub use (\w+)::',txt):
        t=longest(m+'::'+p)
        if t: deps.add(t)
    graph[m]=deps
if 'crate::testing' in graph: del graph['crate::testing']
for k in graph: graph[k]-= {'crate::testing'}
def cycles(graph):
    """The strongly connected components of more than one node (Tarjan)."""
    idx={};low={};st=[];on=set();res=[];c=[0]
    def sc(v):
        idx[v]=low[v]=c[0];c[0]+=1;st.append(v);on.add(v)
        for w in graph.get(v,()):
            if w not in graph: continue
            if w not in idx: sc(w);low[v]=min(low[v],low[w])
            elif w in on: low[v]=min(low[v],idx[w])
        if low[v]==idx[v]:
            comp=[]
            while True:
                w=st.pop();on.discard(w);comp.append(w)
                if w==v:break
            res.append(comp)
    for v in graph:
        if v not in idx: sc(v)
    return [c for c in res if len(c)>1]
sys.setrecursionlimit(10000)
# The same graph with each file counted as the top-level module that holds it (crate::ratelimit::lane as
# crate::ratelimit): layers above the core may use it, the core may not use them back (issue 21).
top=lambda m:'::'.join(m.split('::')[:2])
tops={}
for k,deps in graph.items():
    tops.setdefault(top(k),set()).update(top(d) for d in deps if top(d)!=top(k))
found=[('import cycle between files:',c) for c in cycles(graph)]+[('import cycle between top-level modules:',c) for c in cycles(tops)]
for what,comp in found: print(what,', '.join(sorted(comp)))
if '-v' in sys.argv:
    for k in sorted(graph): print(k,'->',sorted(x.replace('crate::','') for x in graph[k]))
sys.exit(1 if found else 0)
